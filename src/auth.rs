//! `choreo auth gen`: the shop's NATS identities and their rights. One nkey per context (all
//! of its nodes share it), one for the operator (`choreo` commands), one for client
//! applications and one for the simulators; the rights of each are derived from the code
//! (`runtime::node::rights`) and written as a nats-server `authorization` block, with an
//! optional TLS block (a CA and a server certificate for loopback, made with rcgen).
//!
//! Seeds are kept: running it again rewrites the rights (new code, new rights) but keeps
//! every identity. Rotating one is removing its seed file and running it again (see
//! docs/security.md). Nothing it writes is ever committed; seeds and keys are written
//! readable by their owner only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use runtime::node::rights::{self, Rights, User};
use runtime::wire::identity::NatsAuth;
use runtime::Context;

/// The identities besides the contexts'.
pub const OPERATOR: &str = "operator";
pub const CLIENT: &str = "client";
pub const SIM: &str = "sim";

/// What `generate` wrote.
#[derive(Debug, Clone)]
pub struct Generated {
    pub dir: PathBuf,
    /// The file the server includes (`include "auth.conf"`).
    pub conf: PathBuf,
    /// The CA certificate, with TLS.
    pub ca: Option<PathBuf>,
    /// With TLS, the `tls` block of a server's `cluster` section: routes between servers
    /// over TLS, each server presenting its certificate and checking the other's.
    pub route_tls: Option<String>,
}

impl Generated {
    /// How identity `name` (a context, [`OPERATOR`], [`CLIENT`], [`SIM`]) connects.
    pub fn auth(&self, name: &str) -> NatsAuth {
        NatsAuth {
            seed_file: Some(seed_path(&self.dir, name)),
            tls_ca: self.ca.clone(),
            ..Default::default()
        }
    }

    /// The environment a process of identity `name` needs (`CHOREO_NATS_SEED`, ...).
    pub fn env(&self, name: &str) -> Vec<(String, String)> {
        use runtime::wire::identity::{ENV_CA, ENV_SEED};
        let mut env = vec![(
            ENV_SEED.to_string(),
            seed_path(&self.dir, name).display().to_string(),
        )];
        if let Some(ca) = &self.ca {
            env.push((ENV_CA.to_string(), ca.display().to_string()));
        }
        env
    }
}

/// Where identity `name`'s seed is.
pub fn seed_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.nk"))
}

/// The identity of a node hosting `contexts`: the context's own, or for several the
/// union of their rights under their names joined with `+`.
pub fn node_identity(contexts: &[&str]) -> String {
    contexts.join("+")
}

/// Writes (or keeps) a seed per identity and `auth.conf` with everyone's rights in `dir`;
/// with `tls`, a TLS block and certificates for loopback and the host names it lists.
/// `nodes_create`: the contexts may create the streams and consumers they use (a
/// development set-up); otherwise the operator makes them (`choreo provision`)
/// before their nodes start. Each group of `nodes` is one identity: one context (every
/// node of it shares it) or the contexts one node hosts together ([`node_identity`]).
pub fn generate(
    dir: &Path,
    nodes: &[Vec<Arc<dyn Context>>],
    tls: Option<&[String]>,
    nodes_create: bool,
) -> anyhow::Result<Generated> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let systems: Vec<&'static str> = {
        let mut s: Vec<_> = nodes
            .iter()
            .flatten()
            .flat_map(|c| c.message_handlers())
            .flat_map(|comp| comp.external_systems())
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    let mut identities: Vec<(String, Rights)> = nodes
        .iter()
        .map(|group| {
            let names: Vec<&str> = group.iter().map(|c| c.name()).collect();
            (node_identity(&names), rights::of_node(group, nodes_create))
        })
        .collect();
    identities.push((OPERATOR.into(), rights::operator()));
    identities.push((CLIENT.into(), rights::client()));
    identities.push((SIM.into(), rights::simulator(&systems)));
    let mut users = Vec::new();
    for (name, rights) in identities {
        let key = seed(&seed_path(dir, &name))?;
        users.push(User {
            nkey: key.public_key(),
            name,
            rights,
        });
    }
    let mut conf = rights::server_config(&users);
    let (ca, route_tls) = if let Some(hosts) = tls {
        let t = certificates(dir, hosts)?;
        let (cert, key, ca) = (
            t.cert.display().to_string(),
            t.key.display().to_string(),
            t.ca.display().to_string(),
        );
        conf.push_str(&format!(
            "tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n  timeout: 2\n}}\n"
        ));
        let route = format!(
            "  tls {{\n    cert_file: {cert:?}\n    key_file: {key:?}\n    ca_file: {ca:?}\n    verify: true\n    timeout: 2\n  }}\n"
        );
        let snippet = dir.join("route-tls.conf");
        std::fs::write(
            &snippet,
            format!("# Paste into the server's cluster {{ }} block.\n{route}"),
        )
        .with_context(|| format!("write {}", snippet.display()))?;
        (Some(t.ca), Some(route))
    } else {
        (None, None)
    };
    let path = dir.join("auth.conf");
    std::fs::write(&path, conf).with_context(|| format!("write {}", path.display()))?;
    Ok(Generated {
        dir: dir.to_path_buf(),
        conf: path,
        ca,
        route_tls,
    })
}

/// The key pair whose seed is in `path`, made and written there (owner-only) if absent.
fn seed(path: &Path) -> anyhow::Result<nkeys::KeyPair> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return nkeys::KeyPair::from_seed(text.trim())
            .map_err(|e| anyhow::anyhow!("{}: not an nkey seed ({e})", path.display()));
    }
    let key = nkeys::KeyPair::new_user();
    let seed = key.seed().map_err(|e| anyhow::anyhow!("nkey seed: {e}"))?;
    write_private(path, &seed)?;
    Ok(key)
}

/// Writes `text` to `path`, readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The TLS files of a server on loopback.
struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and a server certificate for `127.0.0.1`, `localhost` and `hosts` signed by it,
/// made once (kept when present).
fn certificates(dir: &Path, hosts: &[String]) -> anyhow::Result<Tls> {
    let t = Tls {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    if t.ca.is_file() && t.cert.is_file() && t.key.is_file() {
        return Ok(t);
    }
    let (ca_cert, ca_key) = self_signed_ca("choreo CA")?;
    let key = rcgen::KeyPair::generate()?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(hosts.iter().cloned());
    let mut params = rcgen::CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "choreo nats-server");
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    std::fs::write(&t.ca, ca_cert.pem())?;
    std::fs::write(&t.cert, cert.pem())?;
    write_private(&t.key, &key.serialize_pem())?;
    Ok(t)
}

/// A self-signed CA certificate and its key (the key is not kept: a new server certificate
/// means a new CA).
pub fn self_signed_ca(name: &str) -> anyhow::Result<(rcgen::Certificate, rcgen::KeyPair)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::config::NodeConfig;

    #[test]
    fn seeds_are_kept_and_rights_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let contexts: Vec<_> = crate::contexts::KNOWN
            .iter()
            .map(|c| vec![crate::contexts::build(c, &NodeConfig::default()).unwrap()])
            .collect();
        let g = generate(dir.path(), &contexts, None, false).unwrap();
        let first = std::fs::read_to_string(&g.conf).unwrap();
        let orders = std::fs::read_to_string(seed_path(dir.path(), "orders")).unwrap();
        assert!(orders.starts_with("SU"), "a user seed");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(seed_path(dir.path(), "orders"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = generate(dir.path(), &contexts, None, false).unwrap();
        assert_eq!(std::fs::read_to_string(&again.conf).unwrap(), first);
        // Eight identities: five contexts, operator, client, simulators.
        assert_eq!(first.matches("nkey:").count(), 8);
        assert!(first.contains("\"choreo.payments.cmd.CapturePayment\""));
        assert!(g.ca.is_none());
    }
}
