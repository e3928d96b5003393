//! The guard (`deploy/cluster/guard.yaml`) evaluated for real: its matchConditions,
//! variables, validations and messageExpressions are compiled and run by a
//! CEL interpreter (`cel-interpreter`), in the order the API server runs
//! them, against updates of the fixture launcher pod
//! (`fixtures/kubevirt/virt-launcher-pod.yaml`, as KubeVirt v1.9.0 renders
//! it) that nicplug's token could send. No cluster, no root.
//!
//! What this cannot prove: that the API server's CEL environment (Kubernetes
//! extensions, cost limits) accepts the expressions exactly as this
//! interpreter does; they use only core CEL (`has`, `in`, `all`, `==`, `?:`,
//! string `+`) for that reason.

use std::path::Path;

use cel_interpreter::{Context, Program, Value as Cel};
use serde_json::{Value, json};

const OWN: &str = "nicplug.kubevirt.io/interfaces";
const POD: &str = "virt-launcher-demo-x7k2p";
const NICPLUG: &str = "system:serviceaccount:vms:nicplug";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(
        text.split("\n---")
            .next()
            .expect("the policy is the first document"),
    )
    .unwrap();
    serde_json::to_value(doc).unwrap()
}

/// The launcher pod as it exists once created (a name, an annotation of ours).
fn launcher() -> Value {
    let mut pod = yaml("fixtures/kubevirt/virt-launcher-pod.yaml");
    pod["metadata"]["name"] = json!(POD);
    pod["metadata"]["annotations"][OWN] = json!(r#"{"interfaces":[]}"#);
    pod
}

/// The request's user info for a token of `user` bound to pod `bound`.
fn request(user: &str, bound: Option<&str>) -> Value {
    let extra = match bound {
        Some(pod) => json!({"authentication.kubernetes.io/pod-name": [pod]}),
        None => json!({}),
    };
    json!({
        "namespace": "vms",
        "operation": "UPDATE",
        "userInfo": {"username": user, "extra": extra}
    })
}

#[derive(Debug, PartialEq)]
enum Verdict {
    /// The matchConditions leave the request alone.
    NotMatched,
    Allowed,
    /// Denied with this message.
    Denied(String),
}

fn eval(expr: &str, ctx: &Context) -> Cel {
    let program =
        Program::compile(expr).unwrap_or_else(|e| panic!("CEL does not compile: {expr}\n{e:?}"));
    program
        .execute(ctx)
        .unwrap_or_else(|e| panic!("CEL fails: {expr}\n{e:?}"))
}

fn as_bool(v: Cel, expr: &str) -> bool {
    match v {
        Cel::Bool(b) => b,
        other => panic!("{expr} is not a bool: {other:?}"),
    }
}

/// Runs the guard as the API server does: matchConditions, then the
/// variables (each may use the ones before), then every validation.
fn guard(request: &Value, old: &Value, new: &Value) -> Verdict {
    let policy = yaml("deploy/cluster/guard.yaml");
    let spec = &policy["spec"];
    let mut ctx = Context::default();
    ctx.add_variable("request", request).unwrap();
    ctx.add_variable("object", new).unwrap();
    ctx.add_variable("oldObject", old).unwrap();
    for cond in spec["matchConditions"].as_array().unwrap() {
        let expr = cond["expression"].as_str().unwrap();
        if !as_bool(eval(expr, &ctx), expr) {
            return Verdict::NotMatched;
        }
    }
    let mut variables = std::collections::HashMap::<String, Cel>::new();
    for var in spec["variables"].as_array().into_iter().flatten() {
        let expr = var["expression"].as_str().unwrap();
        let value = eval(expr, &ctx);
        variables.insert(var["name"].as_str().unwrap().to_string(), value);
        ctx.add_variable_from_value("variables", variables.clone());
    }
    for v in spec["validations"].as_array().unwrap() {
        let expr = v["expression"].as_str().unwrap();
        if !as_bool(eval(expr, &ctx), expr) {
            let message = match v["messageExpression"].as_str() {
                Some(m) => match eval(m, &ctx) {
                    Cel::String(s) => s.to_string(),
                    other => panic!("messageExpression gives {other:?}"),
                },
                None => v["message"].as_str().unwrap().to_string(),
            };
            assert_eq!(v["reason"], "Forbidden");
            return Verdict::Denied(message);
        }
    }
    Verdict::Allowed
}

fn denied(v: Verdict, needle: &str) {
    match v {
        Verdict::Denied(m) => assert!(m.contains(needle), "message {m:?} lacks {needle:?}"),
        other => panic!("expected a denial ({needle}), got {other:?}"),
    }
}

fn nicplug() -> Value {
    request(NICPLUG, Some(POD))
}

#[test]
fn nicplug_may_write_and_remove_its_own_annotation() {
    let old = launcher();
    let mut new = old.clone();
    new["metadata"]["annotations"][OWN] = json!(r#"{"interfaces":[{"name":"secondary"}]}"#);
    assert_eq!(guard(&nicplug(), &old, &new), Verdict::Allowed);

    let mut removed = old.clone();
    removed["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(OWN);
    assert_eq!(guard(&nicplug(), &old, &removed), Verdict::Allowed);
    // And the first time, on a pod without it.
    assert_eq!(guard(&nicplug(), &removed, &old), Verdict::Allowed);
}

#[test]
fn other_annotations_are_out_of_reach() {
    let old = launcher();
    assert!(
        old["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"].is_string(),
        "the fixture has Multus' annotation"
    );
    let mut networks = old.clone();
    networks["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] =
        json!(r#"[{"name":"evil","namespace":"vms","interface":"pod0"}]"#);
    denied(guard(&nicplug(), &old, &networks), OWN);

    let mut added = old.clone();
    added["metadata"]["annotations"]["example.com/other"] = json!("x");
    denied(guard(&nicplug(), &old, &added), OWN);

    let mut removed = old.clone();
    removed["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("k8s.v1.cni.cncf.io/networks");
    denied(guard(&nicplug(), &old, &removed), OWN);

    let mut none = old.clone();
    none["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    denied(guard(&nicplug(), &old, &none), OWN);
}

#[test]
fn spec_labels_owners_and_finalizers_are_out_of_reach() {
    let old = launcher();
    let mut spec = old.clone();
    spec["spec"]["containers"][0]["image"] = json!("evil:latest");
    denied(guard(&nicplug(), &old, &spec), "only its annotation");

    let mut label = old.clone();
    label["metadata"]["labels"]["kubevirt.io"] = json!("not-a-launcher");
    denied(guard(&nicplug(), &old, &label), "only its annotation");

    let mut finalizer = old.clone();
    finalizer["metadata"]["finalizers"] = json!(["example.com/hold"]);
    denied(guard(&nicplug(), &old, &finalizer), "only its annotation");

    let mut owner = old.clone();
    owner["metadata"]["ownerReferences"][0]["name"] = json!("someone-else");
    denied(guard(&nicplug(), &old, &owner), "only its annotation");
}

#[test]
fn only_the_pod_the_token_is_bound_to() {
    let old = launcher();
    let mut new = old.clone();
    new["metadata"]["annotations"][OWN] = json!("{}");
    denied(
        guard(
            &request(NICPLUG, Some("virt-launcher-other-abcde")),
            &old,
            &new,
        ),
        "bound to",
    );
    denied(guard(&request(NICPLUG, None), &old, &new), "bound to");
}

#[test]
fn other_users_are_not_matched() {
    let old = launcher();
    let mut new = old.clone();
    new["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] = json!("[]");
    for user in [
        "system:serviceaccount:kubevirt:kubevirt-controller",
        "system:serviceaccount:vms:default",
        "system:serviceaccount:other:nicplug",
    ] {
        assert_eq!(
            guard(&request(user, Some(POD)), &old, &new),
            Verdict::NotMatched,
            "{user}"
        );
    }
}
