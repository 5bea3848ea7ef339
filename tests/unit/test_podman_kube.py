"""tools/podman_kube.py's bridges change only what kube play cannot do: emptyDirs become fresh
per-run 1777 directories, containerPorts (published on the host by podman 4.3) and probes (run by
the bridge itself) leave the played copy; everything else of the chart's pod (command, args, env,
security context, the model repository claim) is played as rendered. Services become DNS aliases."""

import copy
import stat

from tools import podman_kube as pk

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def test_emptydirs_become_private_world_writable_dirs_and_nothing_else_changes(tmp_path):
    docs = pk.render()
    triton = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-triton"))
    before = copy.deepcopy(triton)
    play = pk.Play(docs, [triton["metadata"]["name"]], tmp_path)
    after = play._bridge(triton)["spec"]["template"]["spec"]
    assert triton == before  # the rendered spec (probes and ports are read from it) is left alone
    vols = {v["name"]: v for v in after["volumes"]}
    assert not any("emptyDir" in v for v in vols.values())
    for name in ("tmp", "shm"):
        path = tmp_path / triton["metadata"]["name"] / name
        assert vols[name]["hostPath"] == {"path": str(path), "type": "Directory"}
        assert stat.S_IMODE(path.stat().st_mode) == 0o1777
    assert "persistentVolumeClaim" in vols["models"]
    spec0 = before["spec"]["template"]["spec"]
    assert after["securityContext"] == spec0["securityContext"]
    (played,), (rendered,) = after["containers"], spec0["containers"]
    assert played["ports"] == [] and not any(p in played for p in PROBES)
    assert {k: v for k, v in played.items() if k != "ports"} == {
        k: v for k, v in rendered.items() if k not in ("ports", *PROBES)
    }
    assert played["image"].startswith("localhost/maas-triton-cpu:")


def test_each_pod_is_aliased_by_the_services_that_select_it():
    docs = pk.render()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    aliases = {name: pk.service_aliases(docs, d) for name, d in deployments.items()}
    assert aliases["ct-maas-mesh-triton"] == ["ct-maas-mesh-triton", "ct-maas-mesh-triton-headless"]
    for c in ("registry", "tokenizer", "vision", "router"):
        assert aliases[f"ct-maas-mesh-{c}"] == [f"ct-maas-mesh-{c}"]
    # Every peer address the chart gives a service resolves to one of them.
    names = {a for found in aliases.values() for a in found}
    for d in deployments.values():
        for e in d["spec"]["template"]["spec"]["containers"][0].get("env", []):
            if e["name"].endswith("_ADDRESS"):
                assert all(a.rsplit(":", 1)[0] in names for a in e["value"].split(",")), e
