"""PyTorch state dict files read without PyTorch's unpickler: equal tensors, and a file that
would run code is refused."""

import os
import pickle
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jfe_jax.models.torch_pickle import read_torch_state_dict  # noqa: E402


def test_reads_what_torch_saves_dtypes_views_and_scalars(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "w": torch.randn(3, 5),
        "transposed": base.t(),  # a strided view of a shared storage
        "slice": base[1:3, 2:],
        "half": torch.randn(4).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "ids": torch.arange(7),
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
    }
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(state, path)
    got = read_torch_state_dict(path)
    assert set(got) == set(state)
    for name, tensor in state.items():
        want = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        np.testing.assert_array_equal(np.asarray(got[name], want.dtype), want, err_msg=name)
        assert got[name].shape == tuple(tensor.shape)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_a_file_that_would_run_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.bin")
    torch.save({"w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("/data.pkl"))
    members[pkl] = pickle.dumps({"w": _Boom()}, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(ValueError, match=r"refers to (posix|os|nt)\.system.*refusing"):
        read_torch_state_dict(path)
    (tmp_path / "legacy.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="not a zip-format PyTorch file"):
        read_torch_state_dict(str(tmp_path / "legacy.bin"))
