"""tools/podman_kube.py's bridges change only what kube play cannot do: emptyDirs become fresh
per-run 1777 directories; everything else of the chart's pod (args, security context, probes,
the model repository claim) is played as rendered."""
import copy
import stat

from tools import podman_kube as pk


def test_emptydirs_become_private_world_writable_dirs_and_nothing_else_changes(tmp_path):
    docs = pk.render()
    triton = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-triton"))
    before = copy.deepcopy(triton)
    play = pk.Play(docs, [triton["metadata"]["name"]], tmp_path)
    after = play._bridge(triton)["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in after["volumes"]}
    assert not any("emptyDir" in v for v in vols.values())
    for name in ("tmp", "shm"):
        path = tmp_path / triton["metadata"]["name"] / name
        assert vols[name]["hostPath"] == {"path": str(path), "type": "Directory"}
        assert stat.S_IMODE(path.stat().st_mode) == 0o1777
    assert "persistentVolumeClaim" in vols["models"]
    spec0 = before["spec"]["template"]["spec"]
    for key in ("containers", "securityContext"):
        assert after[key] == spec0[key]
    assert after["containers"][0]["image"].startswith("localhost/maas-triton-cpu:")
