//! The config loader hands `[[frontend]]`, `[[pool]]` and `[[userlist]]` to
//! the proxy crate's checks (lb-proxy's `actions::compile`): its errors reach
//! the user through `config::parse`.

use lb_userspace::config;

#[test]
fn config_loader_rejects_bad_actions() {
    let text = r#"
interfaces = ["lo"]
[[frontend]]
name = "web"
binds = ["127.0.0.1:0"]
default_pool = "app"
[[frontend.request]]
action = "redirect"
location = "/x"
code = 304
[[pool]]
name = "app"
servers = [{ address = "127.0.0.1:1" }]
[[userlist]]
name = "admins"
"#;
    let err = config::parse(text, "lb.toml").err().unwrap().to_string();
    assert!(err.contains("code 304 is not a redirect"), "{err}");
    let ok = text.replace("code = 304", "code = 307");
    let cfg = config::parse(&ok, "lb.toml").unwrap();
    assert_eq!(cfg.proxy.0.userlists[0].name, "admins");
}
