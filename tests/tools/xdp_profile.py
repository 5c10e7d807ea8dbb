#!/usr/bin/env python3
"""Where a live XDP program spends its time, instruction by instruction.

`bpf_stats` says how long a program runs per packet, not where. This VM has
no PMU, but perf's cpu-clock samples land in JIT-compiled BPF code too, and
the kernel hands out each program's machine code and address
(BPF_OBJ_GET_INFO_BY_FD). A sample is charged to the instruction after the
one that stalled, so a cold load shows as a peak right behind it.

    record SECONDS NAME   while traffic runs (e.g. `lb-bench l4live`): saves
                          the code and address of every program called NAME
                          that appears, and `perf record -e cpu-clock -a`
                          into /tmp/xdp-profile.data
    report ID [TOP]       the TOP offsets of program ID with the most samples,
                          each with the instruction before it (the stalled one)

Needs root, perf and binutils' objdump.
"""
import collections
import ctypes
import json
import re
import struct
import subprocess
import sys
import time

SYS_BPF = 321  # x86-64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
DATA = '/tmp/xdp-profile.data'
libc = ctypes.CDLL(None, use_errno=True)


def prog_info(fd, info):
    """bpf_prog_info into `info` (256 bytes, with pointers set by the caller)."""
    libc.syscall(SYS_BPF, BPF_OBJ_GET_INFO_BY_FD,
                 ctypes.create_string_buffer(struct.pack('<IIQ', fd, 256, ctypes.addressof(info)), 128), 16)


def dump(prog_id):
    """Saves program `prog_id`'s machine code and its address."""
    attr = ctypes.create_string_buffer(struct.pack('<III', prog_id, 0, 0), 128)
    fd = libc.syscall(SYS_BPF, BPF_PROG_GET_FD_BY_ID, attr, 12)
    if fd < 0:
        return
    info = ctypes.create_string_buffer(256)
    prog_info(fd, info)
    jited_len, = struct.unpack_from('<I', info, 16)
    code = ctypes.create_string_buffer(jited_len)
    ksym = (ctypes.c_uint64 * 1)()
    info = ctypes.create_string_buffer(256)
    struct.pack_into('<I', info, 16, jited_len)
    struct.pack_into('<Q', info, 24, ctypes.addressof(code))
    struct.pack_into('<I', info, 104, 1)
    struct.pack_into('<Q', info, 112, ctypes.addressof(ksym))
    prog_info(fd, info)
    libc.close(fd)
    open(f'/tmp/xdp-profile-{prog_id}.bin', 'wb').write(code.raw)
    json.dump({'start': ksym[0], 'len': jited_len}, open(f'/tmp/xdp-profile-{prog_id}.json', 'w'))
    print(time.strftime('%H:%M:%S'), 'program', prog_id, 'saved', flush=True)


def record(seconds, name):
    perf = subprocess.Popen(['perf', 'record', '-e', 'cpu-clock', '-F', '10000', '-a', '-o', DATA],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, end = set(), time.time() + seconds
    while time.time() < end:
        out = subprocess.run(['bpftool', 'prog', 'show', 'name', name], capture_output=True, text=True).stdout
        for prog_id in (int(l.split(':')[0]) for l in out.splitlines() if ': xdp' in l):
            if prog_id not in seen:
                seen.add(prog_id)
                dump(prog_id)
        time.sleep(0.5)
    perf.send_signal(2)
    perf.wait()


def report(prog_id, top):
    meta = json.load(open(f'/tmp/xdp-profile-{prog_id}.json'))
    start, length = meta['start'], meta['len']
    ips = subprocess.run(['perf', 'script', '-i', DATA, '-F', 'ip'], capture_output=True, text=True).stdout
    hits = collections.Counter(ip - start for ip in (int(l, 16) for l in ips.split()) if start <= ip < start + length)
    total = sum(hits.values())
    asm = subprocess.run(['objdump', '-D', '-b', 'binary', '-mi386:x86-64', f'/tmp/xdp-profile-{prog_id}.bin'],
                         capture_output=True, text=True).stdout
    insns = [(int(m.group(1), 16), m.group(2).split('\t')[-1])
             for m in (re.match(r'\s*([0-9a-f]+):\t(.*)', l) for l in asm.splitlines()) if m]
    index = {off: i for i, (off, _) in enumerate(insns)}
    print(f'program {prog_id}: {total} samples')
    for off, n in hits.most_common(top):
        i = index.get(off)
        before = insns[i - 1][1] if i else '?'
        print(f'{n:6} {100 * n / total:5.1f}%  {off:#7x}  after: {before}')


if __name__ == '__main__':
    if len(sys.argv) >= 4 and sys.argv[1] == 'record':
        record(float(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) >= 3 and sys.argv[1] == 'report':
        report(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 20)
    else:
        sys.exit(__doc__)
