//! Turns each frontend's ACLs and `use_pool` rules into the proxy's router:
//! rules are tried in order, the first whose condition holds picks the pool,
//! otherwise the frontend's `default_pool` serves the request.

use std::sync::Arc;

use thiserror::Error;

use super::ProxyConfig;
use crate::acl::{self, AclSet, Condition};

/// Picks a pool index (into `ProxyConfig::pools`) for a request to the frontend
/// of the given index (into `ProxyConfig::frontends`); None means that frontend's default pool.
pub type Router = Arc<dyn Fn(usize, &acl::Request<'_>) -> Option<usize> + Send + Sync>;

/// A frontend's routing that does not compile.
#[derive(Debug, Error)]
pub enum RoutingError {
    /// An ACL is invalid.
    #[error("frontend {frontend:?}: {source}")]
    Acl {
        /// Frontend name.
        frontend: String,
        /// What is wrong.
        source: acl::AclError,
    },
    /// A rule names a pool that does not exist.
    #[error("frontend {frontend:?}: use_pool names unknown pool {pool:?}")]
    UnknownPool {
        /// Frontend name.
        frontend: String,
        /// The pool it names.
        pool: String,
    },
}

struct FrontendRoutes {
    acls: AclSet,
    rules: Vec<(Condition, usize)>,
}

/// Compiles every frontend's rules into one router; it is called with the
/// frontend's index in `cfg.frontends`, found once at start-up, not per request.
pub fn router(cfg: &ProxyConfig) -> Result<Router, RoutingError> {
    let mut by_frontend = Vec::new();
    for f in &cfg.frontends {
        let acl_error = |source| RoutingError::Acl {
            frontend: f.name.clone(),
            source,
        };
        let acls = AclSet::compile(&f.acl).map_err(acl_error)?;
        let mut rules = Vec::new();
        for rule in &f.use_pool {
            let pool = cfg
                .pool_index(&rule.pool)
                .ok_or_else(|| RoutingError::UnknownPool {
                    frontend: f.name.clone(),
                    pool: rule.pool.clone(),
                })?;
            let condition = acl::parse_condition(&rule.condition, &|name| acls.contains(name))
                .map_err(acl_error)?;
            rules.push((condition, pool));
        }
        by_frontend.push(FrontendRoutes { acls, rules });
    }
    Ok(Arc::new(
        move |frontend: usize, request: &acl::Request<'_>| {
            let routes = by_frontend.get(frontend)?;
            routes
                .rules
                .iter()
                .find(|(condition, _)| condition.eval(&routes.acls, request))
                .map(|(_, pool)| *pool)
        },
    ))
}
