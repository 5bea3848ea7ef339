"""The Python client and the CLI stand alone: they import and run without the service code (`services`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from maas import tensors
from services.shared import tensors as service_tensors
from services.shared.errors import InvalidArgument

# `services` is made unimportable (a None entry in sys.modules makes `import services` fail), so any
# import of it by the client, the registry client or the CLI raises.
WITHOUT_SERVICES = textwrap.dedent(
    """
    import sys
    sys.modules["services"] = None
    import numpy as np
    import maas.client, maas.registry_client, maas.cli
    from maas.client import MeshClient, infer_request
    request = infer_request("m", {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, (), (), (), None, None, None)
    assert request.inputs[0].datatype == "FP32", request
    assert not [m for m in sys.modules if m.startswith("services.")], sorted(sys.modules)
    sys.argv = ["maas", "--help"]
    maas.cli.main()
    """
)


def test_client_and_cli_import_and_run_without_services():
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVICES], capture_output=True, text=True, timeout=120, check=False
    )
    # --help exits 0 through typer's SystemExit, after printing the commands.
    assert done.returncode == 0, done.stderr
    assert "embed" in done.stdout, done.stdout


def test_the_services_answer_a_bad_tensor_as_invalid_argument():
    bad = tensors.to_proto("x", np.zeros(3, np.float32))
    bad.raw_contents = bad.raw_contents[:-1]
    with pytest.raises(tensors.TensorError, match="11 bytes"):
        tensors.from_proto(bad)
    with pytest.raises(InvalidArgument, match="11 bytes"):
        service_tensors.from_proto(bad)
