#!/usr/bin/env python3
"""Run by `cargo xtask test` (stage 2) on lb-userspace and lb-proxy: fails on
a module cycle, so modules keep reading in one direction.

Module dependency graph of a crate's top-level modules from its sources,
and its cycles (strongly connected components of more than one module).
Edges: every `crate::M` path (in `use` lines and inline), `super::M` from a
top-level module file, `super::super::M` from a nested one, and `use super::{A, M}`
lists; items re-exported at the crate root (`pub use m::X`) are resolved to m.
Test code (after `#[cfg(test)]` in a file, and test-only files) is skipped."""
import os, re, sys
from collections import defaultdict

src = sys.argv[1]
include_tests = '--tests' in sys.argv
mods = set()
files = {}
for root, _, names in os.walk(src):
    for n in names:
        if not n.endswith('.rs'):
            continue
        p = os.path.join(root, n)
        rel = os.path.relpath(p, src)
        parts = rel[:-3].split(os.sep)
        if parts in (['lib'], ['main'], ['mod']):
            top = None
        else:
            top = parts[0]
            mods.add(top)
        files[p] = (top, len(parts) - (1 if parts[-1] == 'mod' else 0))

def code(p):
    text = open(p).read()
    if not include_tests:
        i = text.find('#[cfg(test)]')
        if i >= 0:
            text = text[:i]
    # drop comments and doc comments
    text = re.sub(r'//[^\n]*', '', text)
    return text

# crate root re-exports: name -> module
root_file = os.path.join(src, 'lib.rs')
reexport = {}
if os.path.exists(root_file):
    t = code(root_file)
    for m, body in re.findall(r'pub(?:\([a-z]+\))?\s+use\s+([a-z_0-9]+)::\{([^}]*)\}', t):
        for name in re.findall(r'[A-Za-z_0-9]+', body):
            reexport[name] = m
    for m, name in re.findall(r'pub(?:\([a-z]+\))?\s+use\s+([a-z_0-9]+)::([A-Za-z_0-9]+)\s*;', t):
        reexport[name] = m
    for m, body in re.findall(r'\buse\s+([a-z_0-9]+)::\{([^}]*)\}', t):
        for name in re.findall(r'[A-Za-z_0-9]+', body):
            reexport.setdefault(name, m)
    for m, name in re.findall(r'\buse\s+([a-z_0-9]+)::([A-Za-z_0-9]+)\s*;', t):
        reexport.setdefault(name, m)

edges = defaultdict(set)
def add(a, name):
    b = name if name in mods else reexport.get(name)
    if b and b != a and b in mods:
        edges[a].add(b)

for p, (top, depth) in files.items():
    if top is None:
        continue
    if not include_tests and re.search(r'(^|/)(tests(_\w+)?|test_support)\.rs$', p):
        continue
    t = code(p)
    for name in re.findall(r'\bcrate::([A-Za-z_0-9]+)', t):
        add(top, name)
    for grp in re.findall(r'\bcrate::\{([^}]*)\}', t):
        for name in re.findall(r'(?:^|,)\s*([A-Za-z_0-9]+)', grp):
            add(top, name)
    sup = 'super::' if depth == 1 else 'super::super::'
    for name in re.findall(r'\b' + re.escape(sup) + r'([A-Za-z_0-9]+)', t):
        add(top, name)
    for grp in re.findall(r'\b' + re.escape(sup) + r'\{([^}]*)\}', t):
        for name in re.findall(r'(?:^|,)\s*([A-Za-z_0-9]+)', grp):
            add(top, name)

# Tarjan SCC
index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]
def strong(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in sorted(edges[v]):
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        c = []
        while True:
            w = stack.pop(); on.discard(w); c.append(w)
            if w == v: break
        sccs.append(sorted(c))
sys.setrecursionlimit(10000)
for v in sorted(mods):
    if v not in index:
        strong(v)
if '-v' in sys.argv:
    for a in sorted(edges):
        print(f'{a} -> {", ".join(sorted(edges[a]))}')
cyc = [c for c in sccs if len(c) > 1]
for c in cyc:
    print('cycle:', ' <-> '.join(c))
    for a in c:
        print(f'   {a} -> {", ".join(sorted(b for b in edges[a] if b in c))}')
print(f'{src}: {len(mods)} modules, {sum(len(e) for e in edges.values())} edges, {len(cyc)} cycle(s)')
sys.exit(1 if cyc else 0)
