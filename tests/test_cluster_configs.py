"""Every file in cluster/ passes the code that consumes it, offline: Ray's launcher schema and config
preparation, Ray's KubeRay autoscaler config derivation, the Kubernetes OpenAPI schema
(kubernetes-validate), Ray's `ray job submit` and runtime_env parsers, and er's own CLI and sweep
parsers. Each check is also shown to catch a deliberately broken copy. Imports Ray; starts nothing."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
LAUNCHER = [p for p in YAMLS if p.name.startswith("ray-cluster.")]
KUBE = [p for p in YAMLS if "kuberay" in p.parts]
SCRIPTS = sorted(CLUSTER.rglob("*.sh"))
DOCKERFILES = sorted((CLUSTER / "docker").glob("Dockerfile*"))
# The oldest Kubernetes the manifests claim (CronJob timeZone is GA in 1.27) and the newest schema bundled.
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.I)


def _rel(path: Path) -> str:
    return str(path.relative_to(CLUSTER))


def _ids(paths):
    return [_rel(p) for p in paths]


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def _kind(path: Path, kind: str) -> dict:
    (doc,) = [d for d in _docs(path) if d.get("kind") == kind]
    return copy.deepcopy(doc)


def _er_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def test_the_expected_files_exist():
    names = set(_ids(YAMLS + SCRIPTS + DOCKERFILES))
    assert {"ray-cluster.minimal.yaml", "ray-cluster.full.yaml", "kuberay/raycluster.yaml",
            "kuberay/rayjob-sweep.yaml", "kuberay/cronjob-ingest.yaml", "kuberay/rayservice-serve.yaml", "runtime-env.yaml",
            "scheduled-ingest.sh",
            "local-start.sh", "local-stop.sh", "docker/Dockerfile", "docker/Dockerfile.gpu"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_yaml_parses(path):
    for doc in _docs(path):
        assert isinstance(doc, dict), f"{path}: top level is {type(doc).__name__}, expected a mapping"


# ---------------------------------------------------------------- launcher YAMLs: Ray's schema and preparation


def check_launcher(cfg: dict) -> dict:
    """What `ray up` does before it touches AWS: Ray's schema, defaults, merged setup commands, checks."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["max_workers"] >= sum(t["max_workers"] for t in types.values()), (
        f"global max_workers {prepared['max_workers']} caps the node types below their own max_workers")
    for name, setup in setup_commands_by_type(prepared).items():
        _check_setup(name, setup, gpu=bool(types[name].get("resources", {}).get("GPU")))
    return prepared


def setup_commands_by_type(prepared: dict) -> dict[str, str]:
    """The setup each node type runs, as Ray picks it: a worker type's own worker_setup_commands replace
    the merged setup_commands + worker_setup_commands (ray/autoscaler/_private/autoscaler.py)."""
    out = {}
    for name, t in prepared["available_node_types"].items():
        if name == prepared["head_node_type"]:
            out[name] = prepared["head_setup_commands"]
        else:
            out[name] = t.get("worker_setup_commands", prepared["worker_setup_commands"])
    return {name: "\n".join(cmds) for name, cmds in out.items()}


def _check_setup(name: str, setup: str, gpu: bool) -> None:
    ray_pin = f'"ray[default]=={_installed_ray()}"'
    for needed in (ray_pin, "boto3", "torch==", "er-dist/er-"):
        assert needed in setup, f"node type {name!r} does not install {needed} (its setup: {setup!r})"
    cpu_torch = "download.pytorch.org/whl/cpu" in setup
    assert cpu_torch != gpu, f"node type {name!r}: {'GPU' if gpu else 'CPU'} nodes need the {'CUDA' if gpu else 'CPU'} torch"


def _installed_ray() -> str:
    import ray

    return ray.__version__


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_config_passes_rays_own_checks(path):
    (cfg,) = _docs(path)
    assert cfg["provider"]["type"] == "aws"
    prepared = check_launcher(cfg)
    assert any(t.get("resources", {}).get("GPU") for t in prepared["available_node_types"].values())


def _no_ray_default_on_gpu(cfg):
    cfg["available_node_types"]["gpu"]["worker_setup_commands"] = ["pip install torch==2.13.0 && pip install ~/er-dist/er-*.whl"]


LAUNCHER_BREAKS = {
    "max_workers is text": lambda cfg: cfg.update(max_workers="ten"),
    "no max_workers: Ray's AWS default of 2": lambda cfg: cfg.pop("max_workers"),
    "unknown top-level key": lambda cfg: cfg.update(setup_comands=[]),
    "node type min_workers is text": lambda cfg: cfg["available_node_types"]["gpu"].update(min_workers="0"),
    "min_workers above the global max": lambda cfg: cfg.update(max_workers=1) or cfg["available_node_types"]["cpu"].update(min_workers=2),
    "GPU type's own setup misses ray[default] and boto3": _no_ray_default_on_gpu,
}


@pytest.mark.parametrize("break_it", LAUNCHER_BREAKS.values(), ids=LAUNCHER_BREAKS.keys())
def test_a_broken_launcher_config_is_caught(break_it):
    import jsonschema

    (cfg,) = _docs(CLUSTER / "ray-cluster.minimal.yaml")
    break_it(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError, AssertionError)):
        check_launcher(cfg)


# ---------------------------------------------------------------- RayCluster specs: Ray's KubeRay derivation


def ray_cluster_specs() -> list[tuple[str, str, dict]]:
    """(where, name, RayCluster spec) of raycluster.yaml and of the RayJob's rayClusterSpec."""
    rc = _kind(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")
    job = _kind(CLUSTER / "kuberay" / "rayjob-sweep.yaml", "RayJob")
    svc = _kind(CLUSTER / "kuberay" / "rayservice-serve.yaml", "RayService")
    return [("kuberay/raycluster.yaml", rc["metadata"]["name"], rc["spec"]),
            ("kuberay/rayjob-sweep.yaml", job["metadata"]["name"], job["spec"]["rayClusterSpec"]),
            ("kuberay/rayservice-serve.yaml", svc["metadata"]["name"], svc["spec"]["rayClusterConfig"])]


def derive(name: str, spec: dict) -> dict:
    """The autoscaler config Ray's KubeRay autoscaler derives from the CR (it validates it against ray-schema.json)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _derive_autoscaling_config_from_ray_cr({"metadata": {"name": name, "namespace": "default"},
                                                   "spec": copy.deepcopy(spec)})


def check_ray_cluster(name: str, spec: dict) -> dict[str, dict]:
    """Derive the node types and check they are what er needs: a head that runs no tasks, a GPU group,
    CPU groups without GPUs, and every worker group able to scale up."""
    types = derive(name, spec)["available_node_types"]
    head = types.pop("headgroup")
    assert head["resources"]["CPU"] == 0, "the head should run no tasks (num-cpus 0): the drivers and the GCS live there"
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values()), "no worker group offers a GPU"
    for group, t in types.items():
        assert t["resources"]["CPU"] >= 1 and t["resources"].get("memory"), f"group {group}: {t['resources']}"
        assert 1 <= t["max_workers"] and t["min_workers"] <= t["max_workers"], f"group {group} cannot scale: {t}"
        gpus = {c["resources"]["limits"].get("nvidia.com/gpu", 0)
                for c in _group(spec, group)["template"]["spec"]["containers"]}
        assert (t["resources"].get("GPU", 0) > 0) == (max(gpus) > 0), f"group {group}: Ray's GPUs and the pod's differ"
    return types


def _group(spec: dict, name: str) -> dict:
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == name]
    return group


@pytest.mark.parametrize("where,name,spec", ray_cluster_specs(), ids=[w for w, _, _ in ray_cluster_specs()])
def test_raycluster_specs_derive_the_intended_node_types(where, name, spec):
    types = check_ray_cluster(name, spec)
    assert {"cpu", "gpu"} <= set(types), where
    assert types["gpu"]["resources"]["GPU"] == 1 and "GPU" not in types["cpu"]["resources"]


def _no_gpus(group: dict) -> None:
    group["rayStartParams"].pop("num-gpus")
    for c in group["template"]["spec"]["containers"]:
        for k in ("limits", "requests"):
            c["resources"][k].pop("nvidia.com/gpu")


CLUSTER_BREAKS = {
    "num-gpus is not a number": lambda s: _group(s, "gpu")["rayStartParams"].update({"num-gpus": "one"}),
    "no CPU given anywhere": lambda s: _group(s, "cpu")["template"]["spec"]["containers"][0].pop("resources"),
    "maxReplicas missing": lambda s: _group(s, "gpu").pop("maxReplicas"),
    "minReplicas is text": lambda s: _group(s, "cpu").update(minReplicas="two"),
    "GPU group without GPUs": lambda s: _no_gpus(_group(s, "gpu")),
    "head takes tasks": lambda s: s["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
}


@pytest.mark.parametrize("break_it", CLUSTER_BREAKS.values(), ids=CLUSTER_BREAKS.keys())
def test_a_raycluster_the_derivation_rejects_is_caught(break_it):
    import jsonschema

    (_, name, spec), *_ = ray_cluster_specs()
    spec = copy.deepcopy(spec)
    break_it(spec)
    with pytest.raises((ValueError, KeyError, TypeError, jsonschema.ValidationError, AssertionError)):
        check_ray_cluster(name, spec)


# ---------------------------------------------------------------- Kubernetes objects: the OpenAPI schema


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every pod a document makes."""
    spec, kind = doc.get("spec", {}), doc["kind"]
    if kind == "RayJob":
        out = [("submitterPodTemplate", spec["submitterPodTemplate"])] if "submitterPodTemplate" in spec else []
        return out + [(f"rayClusterSpec.{w}", t) for w, t in pod_templates({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})]
    if kind == "RayService":
        return [(f"rayClusterConfig.{w}", t) for w, t in pod_templates({"kind": "RayCluster", "spec": spec["rayClusterConfig"]})]
    if kind == "RayCluster":
        return [("headGroupSpec.template", spec["headGroupSpec"]["template"])] + [
            (f"workerGroupSpecs[{g['groupName']}].template", g["template"]) for g in spec["workerGroupSpecs"]]
    if kind == "CronJob":
        return [("jobTemplate.spec.template", spec["jobTemplate"]["spec"]["template"])]
    if kind == "Job":
        return [("template", spec["template"])]
    return []


def k8s_objects(doc: dict) -> list[tuple[str, dict]]:
    """What the Kubernetes schema can check: built-in kinds whole; for KubeRay's (no CRD schema offline),
    each embedded pod template as a v1 PodTemplate."""
    if doc.get("apiVersion", "").startswith("ray.io/"):
        name = doc.get("metadata", {}).get("name", "x")
        return [(where, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": t})
                for where, t in pod_templates(doc)]
    return [(doc.get("kind", "?"), doc)]


def check_k8s(doc: dict) -> None:
    assert doc.get("apiVersion") and doc.get("kind"), "a document lacks apiVersion/kind"
    assert doc.get("metadata", {}).get("name"), f"{doc['kind']} has no metadata.name"
    for where, obj in k8s_objects(doc):
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)  # strict: unknown fields are errors too
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                raise AssertionError(f"{doc['kind']} {where}: {path}: {e.message} (Kubernetes {version})") from None


@pytest.mark.parametrize("path", KUBE, ids=_ids(KUBE))
def test_kubernetes_objects_pass_the_openapi_schema(path):
    for doc in _docs(path):
        check_k8s(doc)


K8S_BREAKS = {
    "containerPort is text": ("raycluster.yaml", "RayCluster",
                              lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="abc")),
    "unknown container field": ("rayjob-sweep.yaml", "RayJob",
                                lambda d: _group(d["spec"]["rayClusterSpec"], "gpu")["template"]["spec"]["containers"][0].update(envfrom=[])),
    "toleration is a string": ("raycluster.yaml", "RayCluster",
                               lambda d: _group(d["spec"], "gpu")["template"]["spec"].update(tolerations="nvidia.com/gpu")),
    "CronJob deadline is text": ("cronjob-ingest.yaml", "CronJob", lambda d: d["spec"].update(startingDeadlineSeconds="1h")),
    "CronJob pod restartPolicy misspelt": ("cronjob-ingest.yaml", "CronJob",
                                           lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"].update(restartpolicy="Never")),
    "ConfigMap data is not text": ("rayjob-sweep.yaml", "ConfigMap", lambda d: d["data"].update(extra=3)),
}


@pytest.mark.parametrize("case", K8S_BREAKS.values(), ids=K8S_BREAKS.keys())
def test_a_broken_kubernetes_object_is_caught(case):
    file, kind, break_it = case
    doc = _kind(CLUSTER / "kuberay" / file, kind)
    check_k8s(copy.deepcopy(doc))  # the original passes
    break_it(doc)
    with pytest.raises(AssertionError):
        check_k8s(doc)


# ---------------------------------------------------------------- command lines: er's and Ray's own parsers

KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "exec", "time", "nohup", "{", "}"}
_REDIRECT = re.compile(r"(?<=\s)\d*(?:>>?|<)(?:&-|&\d+|\s*[^\s;|&()]+)")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_EXAMPLE = re.compile(r"^\s*#\s{2,}(\S.*)$")  # commands in comments are indented: `#   er ingest ...`


def simple_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, as argv lists: continuations joined, `$(...)` opened,
    redirections dropped, split at ; | & ( ), leading assignments and keywords left out. Enough for
    the scripts in cluster/, not a shell parser."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        line = _REDIRECT.sub(" ", " " + line.replace("$(", " ( ").replace("`", " ; "))
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        cmd: list[str] = []
        for tok in [*lex, ";"]:
            if set(tok) <= set("();<>|&"):
                if cmd:
                    out.append(cmd)
                cmd = []
            elif cmd or not (tok in KEYWORDS or _ASSIGN.match(tok)):
                cmd.append(tok)
    return out


def _is_er(name: str) -> bool:
    return name == "er" or name.endswith("/er") or name in ("$ER", "${ER}")


def er_commands(script: str, where: str) -> list[tuple[str, list[str]]]:
    """(where, argv after `er`) of every `er` the script runs: directly, through `sh -c`, `ray exec`,
    or as the entrypoint of `ray job submit` (checked with Ray's own CLI)."""
    return [found for cmd in simple_commands(script) for found in _from_command(cmd, where)]


def _from_command(cmd: list[str], where: str) -> list[tuple[str, list[str]]]:
    if not cmd:
        return []
    if _is_er(cmd[0]):  # "$@" is the caller's own arguments: nothing to check here
        return [(where, [a for a in cmd[1:] if a not in ("$@", "$*")])]
    if cmd[0] in ("sh", "bash", "/bin/sh", "/bin/bash") and cmd[1:2] == ["-c"] and len(cmd) > 2:
        return er_commands(cmd[2], where)
    if cmd[:3] == ["ray", "job", "submit"]:
        entrypoint = list(ray_job_submit(cmd[3:], where))
        # The local shell expands ~ to this machine's home, and Ray quotes what reaches it (shlex.join).
        assert not any(a.startswith("~") for a in entrypoint), f"{where}: ~ in a job's entrypoint: {entrypoint}"
        return _from_command(entrypoint, where)
    if cmd[:2] == ["ray", "exec"] and len(cmd) > 3:
        return er_commands(cmd[3], where)
    return []


def ray_job_submit(args: list[str], where: str) -> tuple[str, ...]:
    """Parse `ray job submit ARGS` with Ray's own click command (nothing is sent); the entrypoint."""
    import click
    from ray.dashboard.modules.job.cli import submit

    try:
        ctx = submit.make_context("ray job submit", list(args))
    except click.ClickException as e:
        raise AssertionError(f"{where}: Ray refuses `ray job submit {shlex.join(args)}`: {e.format_message()}") from None
    return ctx.params["entrypoint"]


def parse_er(argv: list[str], where: str):
    """er's own parser on the argv after `er`; None for `--help`."""
    from pipelines.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 0:
            return None
        msg = (err.getvalue().strip().splitlines() or ["?"])[-1]
        raise AssertionError(f"{where}: er refuses `er {shlex.join(argv)}`: {msg}") from None


def _expand(script: str, env: dict) -> str:
    """$VAR / ${VAR} replaced by the container's literal env values, as its shell will."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), script)


def _containers(doc: dict):
    for where, t in pod_templates(doc):
        for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]:
            yield f"{where}.{c['name']}", c


def container_script(container: dict) -> str:
    """The container's command line as a shell script (its own for `sh -c`), env values filled in."""
    argv = list(container.get("command", [])) + list(container.get("args", []))
    env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    if argv[:1] and argv[0].rsplit("/", 1)[-1] in ("sh", "bash") and argv[1:2] == ["-c"]:
        return _expand(argv[2], env)
    return shlex.join(argv)


def _examples(text: str) -> list[tuple[int, str]]:
    """(line number, command) of the example commands in comments, continued lines joined."""
    out, pending = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = _EXAMPLE.match(line)
        if not m:
            pending = None
            continue
        cmd = m.group(1)
        if pending is not None:
            out[-1] = (out[-1][0], out[-1][1] + " " + cmd.rstrip("\\"))
        else:
            out.append((n, cmd.rstrip("\\")))
        pending = cmd if cmd.endswith("\\") else None
    return out


def command_sources() -> list[tuple[str, str]]:
    """(where, shell script) for every command line in cluster/: scripts, container commands, the RayJob's
    entrypoint, launcher *_commands, example commands in comments and in cluster/README.md."""
    out = [(_rel(p), p.read_text()) for p in SCRIPTS]
    for path in YAMLS + SCRIPTS + DOCKERFILES:
        out += [(f"{_rel(path)}:{n} (comment)", cmd) for n, cmd in _examples(path.read_text())]
    for path in YAMLS:
        for doc in _docs(path):
            if path in LAUNCHER:
                lists = [(k, v) for k, v in doc.items() if k.endswith("_commands")]
                lists += [(f"{t}.{k}", v) for t, nt in doc["available_node_types"].items() for k, v in nt.items()
                          if k.endswith("_commands")]
                out += [(f"{_rel(path)}: {k}", "\n".join(v)) for k, v in lists]
            if "kind" in doc:  # not the launcher's or the runtime env's
                out += [(f"{_rel(path)}: {doc['kind']} {w}", container_script(c)) for w, c in _containers(doc)]
            if doc.get("kind") == "RayJob":
                out.append((f"{_rel(path)}: RayJob entrypoint", doc["spec"]["entrypoint"]))
    readme = (CLUSTER / "README.md").read_text()
    out += [(f"README.md block {i}", block) for i, block in enumerate(re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S))]
    return out


def test_every_er_command_in_cluster_is_one_er_accepts():
    found = [(where, argv) for where, script in command_sources() for where, argv in er_commands(script, where)]
    for where, argv in found:
        parse_er(argv, where)
    files = {re.split(r":| block", where)[0] for where, _ in found}
    # The check is only worth something if it sees the commands that matter.
    assert {"kuberay/cronjob-ingest.yaml", "kuberay/rayjob-sweep.yaml", "kuberay/raycluster.yaml", "scheduled-ingest.sh",
            "ray-cluster.minimal.yaml", "ray-cluster.full.yaml", "runtime-env.yaml", "README.md"} <= files, files


def _cron_container(doc: dict) -> dict:
    (c,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return c


def _cron_script_edit(old: str, new: str):
    def edit(doc):
        c = _cron_container(doc)
        assert old in c["args"][0]
        c["args"][0] = c["args"][0].replace(old, new)
    return edit


COMMAND_BREAKS = {
    "unknown er flag in the CronJob": ("cronjob-ingest.yaml", "CronJob", _cron_script_edit('--cache "$CACHE"', '--cache "$CACHE" --shards 4')),
    "unknown er command in the CronJob": ("cronjob-ingest.yaml", "CronJob", _cron_script_edit("er ingest", "er ingets")),
    "unknown ray job submit flag": ("cronjob-ingest.yaml", "CronJob", _cron_script_edit("--no-wait --", "--nowait --")),
    "--cache dropped in the CronJob": ("cronjob-ingest.yaml", "CronJob", _cron_script_edit('--cache "$CACHE"', '"$CACHE"')),
    "~ in a submitted entrypoint": ("cronjob-ingest.yaml", "CronJob", _cron_script_edit('er ingest "$CORPUS"', "er ingest ~/corpus")),
    "unknown er flag in the RayJob": ("rayjob-sweep.yaml", "RayJob",
                                      lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"] + " --max-concurrency 2")),
}


@pytest.mark.parametrize("case", COMMAND_BREAKS.values(), ids=COMMAND_BREAKS.keys())
def test_a_broken_command_is_caught(case):
    file, kind, break_it = case
    doc = _kind(CLUSTER / "kuberay" / file, kind)
    break_it(doc)
    scripts = [container_script(c) for _, c in _containers(doc)]
    scripts += [doc["spec"]["entrypoint"]] if kind == "RayJob" else []
    with pytest.raises(AssertionError):
        for script in scripts:
            for where, argv in er_commands(script, file):
                parse_er(argv, where)


TEXT_BREAKS = {  # file: (text in it, replacement)
    "scheduled-ingest.sh": ('--cache "$CACHE"', '--cahce "$CACHE"'),
    "ray-cluster.full.yaml": ("-- er sweep /home/ubuntu/sweep.yaml", "-- er sweep /home/ubuntu/sweep.yaml --workers 2"),
    "README.md": ("-- er ingest s3://corpus/2026/", "-- er ingest --corpus s3://corpus/2026/"),
}


@pytest.mark.parametrize("file", TEXT_BREAKS, ids=TEXT_BREAKS.keys())
def test_a_broken_command_in_a_script_comment_or_readme_is_caught(file):
    old, new = TEXT_BREAKS[file]
    text = (CLUSTER / file).read_text()
    assert old in text
    text = text.replace(old, new)
    scripts = [text] if file.endswith(".sh") else [cmd for _, cmd in _examples(text)]
    scripts += re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S) if file.endswith(".md") else []
    with pytest.raises(AssertionError, match="er refuses"):
        for script in scripts:
            for where, argv in er_commands(script, file):
                parse_er(argv, where)


# ---------------------------------------------------------------- the RayJob's sweep and the CronJob


def _sweep(doc: dict):
    from pipelines.sweep import parse_sweep

    return parse_sweep(yaml.safe_load(doc["data"]["sweep.yaml"]), "/config", check_paths=False, source="sweep ConfigMap")


def test_rayjob_runs_its_sweep_on_gpus_with_everything_on_s3():
    path = CLUSTER / "kuberay" / "rayjob-sweep.yaml"
    job, cm = _kind(path, "RayJob"), _kind(path, "ConfigMap")
    ((where, argv),) = er_commands(job["spec"]["entrypoint"], "RayJob entrypoint")
    args = parse_er(argv, where)
    assert args.cmd == "sweep" and args.sweep == "/config/sweep.yaml"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "sweep", "configMap": {"name": cm["metadata"]["name"]}} in head["volumes"]
    assert {"name": "sweep", "mountPath": "/config"} in head["containers"][0]["volumeMounts"]

    sweep = _sweep(cm)  # er's own sweep parser: the keys, types and values `er sweep` accepts
    for url in [sweep.cache, sweep.output, sweep.storage_path] + [t.path for t in sweep.tasks]:
        assert url and url.startswith("s3://"), f"{url}: the cluster's pods are deleted after the sweep, and other pods read it"
    # The GPU trials ask for GPUs, and as many run at once as the gpu group holds.
    types = check_ray_cluster(job["metadata"]["name"], job["spec"]["rayClusterSpec"])
    gpu = types["gpu"]
    assert sweep.gpus_per_worker >= 1
    assert sweep.max_concurrent * sweep.workers * sweep.gpus_per_worker <= gpu["max_workers"] * gpu["resources"]["GPU"]
    assert sweep.gpus_per_worker <= gpu["resources"]["GPU"] and sweep.cpus_per_worker + 0.5 <= gpu["resources"]["CPU"]
    # The cluster goes when the sweep ends; the TTL only delays that.
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] >= 0


def test_a_broken_sweep_configmap_is_caught():
    from er_core import ErError

    cm = _kind(CLUSTER / "kuberay" / "rayjob-sweep.yaml", "ConfigMap")
    cm["data"]["sweep.yaml"] = cm["data"]["sweep.yaml"].replace("gpus_per_worker: 1", "gpus_per_worker: one")
    with pytest.raises(ErError, match="gpus_per_worker"):
        _sweep(cm)


def test_cronjob_submits_through_the_jobs_api_once_per_day():
    cron = _kind(CLUSTER / "kuberay" / "cronjob-ingest.yaml", "CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0 and spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] > 0
    container = _cron_container(cron)
    assert container["command"] == ["sh", "-c"], "container args are not shell-expanded: the id needs `date`"
    script = container_script(container)
    assert "date -u +%Y%m%d" in script and "already exists" in script
    (submit,) = [c for c in simple_commands(script) if c[:3] == ["ray", "job", "submit"]]
    ray_job_submit(submit[3:], "CronJob")
    opts = dict(zip(submit, submit[1:]))
    head = _kind(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")["metadata"]["name"]
    assert opts["--address"] == f"http://{head}-head-svc:8265", "the Jobs API of raycluster.yaml's head Service"
    assert opts["--submission-id"] == "$id" and "--no-wait" in submit
    ((where, argv),) = er_commands(script, "CronJob")
    args = parse_er(argv, where)
    assert args.cmd == "ingest" and args.cache.startswith("s3://") and args.corpus[0].startswith("s3://")


def _fake_ray(bin_dir: Path) -> None:
    """A `ray` and a `python` standing in for the cluster: submissions are files; a taken id fails as Ray's does."""
    (bin_dir / "ray").write_text("""#!/usr/bin/env bash
echo "ray $*" >>"$FAKE_RAY/calls"
[[ -e $FAKE_RAY/down ]] && { echo "ConnectionError: Failed to connect to Ray at address: $4" >&2; exit 1; }
if [[ "$1 $2" == "job submit" ]]; then
  id=$(sed -n 's/.*--submission-id \\([^ ]*\\).*/\\1/p' <<<"$*")
  if [[ -e $FAKE_RAY/jobs/$id ]]; then
    echo "RuntimeError: Request failed with status code 500: Traceback ... ValueError: Job with submission_id $id already exists. Please use a different submission_id.." >&2
    exit 1
  fi
  mkdir -p "$FAKE_RAY/jobs" && touch "$FAKE_RAY/jobs/$id" && echo "Job '$id' submitted successfully"
fi
""")
    (bin_dir / "python").write_text('#!/usr/bin/env bash\ncat "$FAKE_RAY/status"\n')
    for f in ("ray", "python"):
        (bin_dir / f).chmod(0o755)


def test_cronjob_script_runs_the_ingest_once_however_often_it_runs(tmp_path):
    container = _cron_container(_kind(CLUSTER / "kuberay" / "cronjob-ingest.yaml", "CronJob"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_ray(bin_dir)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_RAY": str(tmp_path)}
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    env.pop("ER_SUBMISSION_ID", None)

    def run():
        return subprocess.run(container["command"] + container["args"], env=env, capture_output=True, text=True, timeout=30)

    (tmp_path / "status").write_text("SUCCEEDED\n")
    first, second = run(), run()
    assert first.returncode == 0 and second.returncode == 0, (first.stdout + first.stderr, second.stdout + second.stderr)
    (job,) = (tmp_path / "jobs").iterdir()  # one job, however often the pod ran
    assert re.fullmatch(r"er-ingest-\d{8}", job.name)
    assert "following it" in second.stdout
    assert f"Ray job {job.name}: SUCCEEDED" in second.stdout

    (tmp_path / "status").write_text("FAILED\n")
    assert run().returncode != 0, "a failed Ray job must fail the Kubernetes Job"
    (tmp_path / "down").touch()
    down = run()
    assert down.returncode != 0 and "following it" not in down.stdout, "an unreachable head is a failure, not 'already exists'"


# ---------------------------------------------------------------- credentials, runtime env, images


def check_no_inline_credentials(doc: dict) -> None:
    assert doc.get("kind") != "Secret", "a Secret in the manifests puts its keys in the repo: create it with kubectl"
    for where, c in _containers(doc):
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]):
                assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']} is inline"


@pytest.mark.parametrize("path", KUBE, ids=_ids(KUBE))
def test_credentials_come_from_a_secret_or_a_service_account(path):
    for doc in _docs(path):
        check_no_inline_credentials(doc)


def test_an_inline_credential_is_caught():
    doc = _kind(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]
    with pytest.raises(AssertionError, match="inline"):
        check_no_inline_credentials(doc)


def check_runtime_env(env: dict) -> dict:
    """Ray's own reading of the file (as `ray job submit --runtime-env` does), then er's rules."""
    from ray.runtime_env import RuntimeEnv

    from er_core.secrets import find_secrets

    parsed = dict(RuntimeEnv(**env))
    assert set(env) <= RuntimeEnv.known_fields, f"fields Ray does not know: {set(env) - RuntimeEnv.known_fields}"
    assert not find_secrets(env, "runtime_env"), "credentials in a runtime env reach Ray's logs"
    assert not [k for k in env.get("env_vars", {}) if SECRET_NAME.search(k)], "credentials in env_vars reach Ray's logs"
    return parsed


def test_runtime_env_file_is_one_ray_accepts_and_ships_the_wheel():
    from ray._private.runtime_env import packaging
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    env = parse_runtime_env_args(runtime_env=str(CLUSTER / "runtime-env.yaml"))
    check_runtime_env(env)
    assert env["working_dir"] == "."
    wheel = f"er-{_er_version()}-py3-none-any.whl"
    assert env["pip"]["packages"] == [f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/dist/{wheel}"]
    # The wheel must travel with working_dir: neither .gitignore nor `excludes` may leave dist/ behind.
    excluded = [packaging._get_excludes(REPO, env["excludes"])]
    excluded += packaging.get_excludes_from_ignore_files(REPO, include_gitignore=True)
    assert not any(ex(REPO / "dist" / wheel) for ex in excluded), "dist/ is excluded from the upload"
    # And what is uploaded (the repo as Ray's own walk sees it) stays far below Ray's limit.
    sizes = []
    packaging._dir_travel(REPO, [packaging._get_excludes(REPO, env["excludes"])],
                          lambda p: sizes.append(p.stat().st_size) if p.is_file() else None, include_gitignore=True)
    assert sum(sizes) < packaging.PACKAGE_SIZE_WARNING, f"working_dir uploads {sum(sizes) >> 20} MiB"


@pytest.mark.parametrize("bad", [{"pip": 5}, {"working_dir": ["."]}, {"excludes": ".git"},
                                 {"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}, {"env_vars": {"token": "x"}}],
                         ids=["pip", "working_dir", "excludes", "a secret key", "a token"])
def test_a_broken_runtime_env_is_caught(bad):
    env = yaml.safe_load((CLUSTER / "runtime-env.yaml").read_text())
    with pytest.raises((TypeError, ValueError, AssertionError)):
        check_runtime_env({**env, **bad})


def test_images_and_versions_agree():
    ray_version, er_version = _installed_ray(), _er_version()
    cpu, gpu = ((CLUSTER / "docker" / n).read_text() for n in ("Dockerfile", "Dockerfile.gpu"))
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_version)}-py\d+$", cpu, re.M), "CPU image: Ray's image at er's Ray"
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_version)}-py\d+-(gpu|cu\d+)$", gpu, re.M), "GPU image: Ray's CUDA image"
    for text in (cpu, gpu):
        assert f"ARG ER_VERSION={er_version}" in text
    assert "whl/cpu" in cpu and "whl/cpu" not in gpu and "torch.version.cuda" in gpu
    for path in KUBE:
        for doc in _docs(path):
            spec = doc.get("spec", {}).get("rayClusterSpec", doc.get("spec", {}))
            if "rayVersion" in spec:
                assert spec["rayVersion"] == ray_version, f"{path.name}: rayVersion"
            for where, c in _containers(doc):
                image = c["image"]
                if image.startswith("rayproject/ray:"):
                    assert image.split(":")[1].startswith(ray_version), f"{where}: {image}"
                else:
                    gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
                    assert image.endswith(f":{er_version}-{'gpu' if gpus else 'cpu'}"), f"{path.name} {where}: {image}"
    for path in LAUNCHER:
        assert f'"ray[default]=={ray_version}"' in path.read_text()


@pytest.mark.parametrize("path", SCRIPTS, ids=_ids(SCRIPTS))
def test_shell_script_syntax(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"{path.name}: {result.stderr}"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(path, os.X_OK), f"{path.name} is not executable (chmod +x)"


# ---------------------------------------------------------------- RayService: the Serve config er's application takes


def check_serve_config(text: str) -> None:
    """serveConfigV2 as Serve reads it (ServeDeploySchema), each application's import path resolving to er's builder,
    and its args er's ServeConfig (unknown keys and bad values refused as `er serve` refuses them)."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from pipelines.configs import ServeConfig

    conf = yaml.safe_load(text)
    ServeDeploySchema.model_validate(conf) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(conf)
    for app in conf["applications"]:
        module, name = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), name)), app["import_path"]
        ServeConfig(**app["args"]).require()
        assert app["route_prefix"] == app["args"].get("route_prefix", "/er")


def test_rayservice_runs_ers_application_with_valid_settings_and_a_token():
    doc = _kind(CLUSTER / "kuberay" / "rayservice-serve.yaml", "RayService")
    check_serve_config(doc["spec"]["serveConfigV2"])
    args = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["token_env"] and yaml.safe_load(doc["spec"]["serveConfigV2"])["http_options"]["host"] == "0.0.0.0"
    for where, c in _containers(doc):  # the token's Secret reaches every pod, so any node can build the app
        assert {"secretRef": {"name": "er-serve-token"}} in c.get("envFrom", []), where


SERVE_BREAKS = {
    "unknown er serve setting": lambda a: a["args"].update(replicas=2),
    "max_replicas below min_replicas": lambda a: a["args"].update(min_replicas=3, max_replicas=2),
    "import path of no builder": lambda a: a.update(import_path="pipelines.serve:nothing_here"),
    "no model folders": lambda a: a["args"].pop("model_dir"),
}


@pytest.mark.parametrize("break_it", SERVE_BREAKS.values(), ids=SERVE_BREAKS.keys())
def test_a_broken_serve_config_is_caught(break_it):
    doc = _kind(CLUSTER / "kuberay" / "rayservice-serve.yaml", "RayService")
    conf = yaml.safe_load(doc["spec"]["serveConfigV2"])
    break_it(conf["applications"][0])
    with pytest.raises(Exception):  # noqa: B017 - Serve's schema, the import, or er's one-line ErError
        check_serve_config(yaml.safe_dump(conf))
