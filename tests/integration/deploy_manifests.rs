//! The deployment files, checked offline (no kubectl, no cloud): every YAML document of
//! deploy/kubernetes/ and deploy/function-compute/ parses, the objects refer to each other
//! consistently (selectors, ports, the volume claim, the autoscaler's target and metric),
//! probes point at wick's liveness and readiness routes, the drain fits the grace period,
//! and every environment block parses with wick's own settings parser.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use candlewick::config::Config;
use serde::Deserialize;
use serde_norway::Value;

fn docs(rel: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            let mut v = Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}"));
            v.apply_merge().unwrap_or_else(|e| panic!("{rel}: {e}"));
            v
        })
        .collect()
}

fn k8s(kind: &str) -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).expect("deploy/kubernetes").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") {
            continue;
        }
        for d in docs(&format!("deploy/kubernetes/{name}")) {
            for key in ["apiVersion", "kind"] {
                assert!(d[key].is_string(), "{name}: {key} in {d:?}");
            }
            assert!(d["metadata"]["name"].is_string(), "{name}: metadata.name");
            if d["kind"] == kind {
                found.push(d);
            }
        }
    }
    assert_eq!(found.len(), 1, "one {kind}");
    found.remove(0)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// Environment entries through wick's own parser: anything it would refuse fails here.
fn parse_env(env: &HashMap<String, String>) -> Config {
    Config::from_lookup(|k| env.get(k).cloned()).unwrap_or_else(|e| panic!("{e}: {env:?}"))
}

#[test]
fn kubernetes_objects_fit_together() {
    let dep = k8s("Deployment");
    let pod = &dep["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(dep["spec"]["selector"]["matchLabels"]["app"], labels["app"]);
    assert_eq!(labels["llm-d.ai/engine-type"], "vllm");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"].as_u64(), Some(1));

    let env: HashMap<String, String> = c["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| (s(&e["name"]).to_string(), s(&e["value"]).to_string()))
        .collect();
    let cfg = parse_env(&env);
    assert!(!cfg.preload.is_empty(), "a preloaded model");
    let port = c["ports"][0]["containerPort"].as_u64().expect("port");
    assert_eq!(u64::from(cfg.host.port), port);
    assert_eq!(cfg.host.host, "0.0.0.0");

    // The store is the shared volume claim.
    let mount = c["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| cfg.models_dir.starts_with(s(&m["mountPath"])))
        .expect("OLLAMA_MODELS is on a mounted volume");
    let volume = pod["spec"]["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    let pvc = k8s("PersistentVolumeClaim");
    assert_eq!(
        volume["persistentVolumeClaim"]["claimName"],
        pvc["metadata"]["name"]
    );
    assert!(pvc["spec"]["accessModes"]
        .as_sequence()
        .expect("modes")
        .contains(&Value::from("ReadWriteMany")));

    // Probes: readiness on /api/ready, liveness on /, on the container's port.
    let port_name = c["ports"][0]["name"].clone();
    for (probe, path) in [
        ("readinessProbe", "/api/ready"),
        ("livenessProbe", "/"),
        ("startupProbe", "/"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], port_name, "{probe}");
    }
    // The drain: preStop, then WICK_SHUTDOWN_TIMEOUT, within the grace period.
    let pre = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .expect("preStop command");
    assert_eq!(pre[0], "sleep");
    let pre_stop = Duration::from_secs(s(&pre[1]).parse().expect("seconds"));
    let grace = Duration::from_secs(
        pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace"),
    );
    assert!(
        pre_stop + cfg.shutdown_timeout < grace,
        "{pre_stop:?} + {:?} < {grace:?}",
        cfg.shutdown_timeout
    );

    let svc = k8s("Service");
    assert_eq!(svc["spec"]["selector"]["app"], labels["app"]);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], port_name);

    let pool = k8s("InferencePool");
    assert_eq!(s(&pool["apiVersion"]), "inference.networking.k8s.io/v1");
    assert_eq!(
        pool["spec"]["selector"]["matchLabels"]["app"],
        labels["app"]
    );
    assert_eq!(
        pool["spec"]["targetPorts"][0]["number"].as_u64(),
        Some(port)
    );
    assert!(pool["spec"]["endpointPickerRef"]["name"].is_string());

    let hpa = k8s("HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        dep["metadata"]["name"]
    );
    let metric = s(&hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]);
    // The adapter rule maps wick's gauge to the name the HPA asks for.
    let rules: Value =
        serde_norway::from_str(s(&k8s("ConfigMap")["data"]["config.yaml"])).expect("adapter rules");
    let rule = &rules["rules"][0];
    assert_eq!(rule["name"]["as"], metric);
    assert_eq!(rule["name"]["matches"], "vllm:num_requests_waiting");
    assert!(s(&rule["seriesQuery"]).starts_with("vllm:num_requests_waiting{"));
}

/// `${vars.a.b}` references of Serverless Devs, resolved from the file's `vars`.
fn resolve(v: &Value, vars: &Value) -> Value {
    match v {
        Value::String(text) => match text
            .strip_prefix("${vars.")
            .and_then(|r| r.strip_suffix('}'))
        {
            Some(path) => path.split('.').fold(vars.clone(), |v, k| v[k].clone()),
            None => v.clone(),
        },
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), resolve(v, vars)))
                .collect(),
        ),
        Value::Sequence(items) => Value::Sequence(items.iter().map(|i| resolve(i, vars)).collect()),
        other => other.clone(),
    }
}

#[test]
fn function_compute_gpu_functions() {
    let file = docs("deploy/function-compute/s.yaml").remove(0);
    let vars = file["vars"].clone();
    let mut gpus = Vec::new();
    for (name, res) in file["resources"].as_mapping().expect("resources") {
        assert_eq!(res["component"], "fc3", "{name:?}");
        let p = resolve(&res["props"], &vars);
        assert_eq!(p["runtime"], "custom-container");
        gpus.push(s(&p["gpuConfig"]["gpuType"]).to_string());
        assert!(p["gpuConfig"]["gpuMemorySize"].as_u64().is_some());
        assert!(
            p["instanceConcurrency"].as_u64().unwrap_or(1) > 1,
            "batching needs concurrent requests per instance"
        );
        let env: HashMap<String, String> = p["environmentVariables"]
            .as_mapping()
            .expect("environment")
            .iter()
            .map(|(k, v)| (s(k).to_string(), s(v).to_string()))
            .collect();
        let cfg = parse_env(&env);
        let cc = &p["customContainerConfig"];
        assert_eq!(cc["port"].as_u64(), Some(u64::from(cfg.host.port)));
        assert_eq!(cc["healthCheckConfig"]["httpGetUrl"], "/api/ready");
        assert!(s(&cc["image"]).contains("candlewick"));
        let mounts = p["nasConfig"]["mountPoints"].as_sequence().expect("NAS");
        assert_eq!(mounts[0]["mountDir"], "/ollama");
        assert!(
            cfg.models_dir.starts_with("/ollama"),
            "the store is on the NAS"
        );
        assert!(!cfg.preload.is_empty());
        let trigger = &p["triggers"][0];
        assert_eq!(trigger["triggerType"], "http");
        let methods = trigger["triggerConfig"]["methods"]
            .as_sequence()
            .expect("methods");
        for m in ["GET", "POST", "DELETE", "HEAD", "OPTIONS"] {
            assert!(methods.contains(&Value::from(m)), "{m}");
        }
        assert!(
            p["timeout"].as_u64().unwrap_or(0) >= 300,
            "long streams fit"
        );
    }
    gpus.sort();
    assert_eq!(gpus, ["fc.gpu.ampere.1", "fc.gpu.tesla.1"]);

    // LobeChat's settings point its Ollama provider at the trigger.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/function-compute/lobechat.env"),
    )
    .expect("lobechat.env");
    let set: HashMap<&str, &str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .filter_map(|l| l.split_once('='))
        .collect();
    assert_eq!(set.get("ENABLED_OLLAMA"), Some(&"1"));
    let url = set.get("OLLAMA_PROXY_URL").expect("OLLAMA_PROXY_URL");
    assert!(url.starts_with("https://") && !url.ends_with('/'), "{url}");
    assert!(set.contains_key("OLLAMA_MODEL_LIST"));
}
