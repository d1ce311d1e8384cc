"""Mesh and shardings on 4 forced host devices (in a subprocess: the device count is fixed at JAX start-up)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from vpns_jax.core import parallel
    from vpns_jax.data import pipeline
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 4 and mesh.axis_names == ("data",)
    try:
        parallel.check_global_batch_size(6, mesh)
        raise SystemExit("6 rows on 4 devices must be refused")
    except ValueError as error:
        assert "does not divide by the 4 devices" in str(error) and "multiple of 4" in str(error)
    parallel.check_global_batch_size(8, mesh)
    local = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "label": np.arange(8, dtype=np.int32)}
    batch = parallel.global_batch(local, mesh)
    assert batch["image"].shape == (8, 3)
    for shard in batch["label"].addressable_shards:
        rows = np.asarray(shard.data).tolist()
        device = mesh.devices.tolist().index(shard.device)
        assert rows == [2 * device, 2 * device + 1], (device, rows)
    weights = parallel.replicate({"w": jnp.ones((3,))}, mesh)
    assert len(weights["w"].sharding.device_set) == 4
    total = jax.jit(lambda w, b: jnp.sum(b["image"] @ w["w"]))(weights, batch)
    assert float(total) == float(local["image"].sum())
    # uint8 pixels arrive as ToTensor's floats, still split over the devices.
    pixels = {"image": np.arange(8 * 2 * 2 * 3, dtype=np.uint8).reshape(8, 2, 2, 3) * 2, "label": np.arange(8)}
    scaled = parallel.global_batch(pixels, mesh, scale_pixels=pipeline.unit_pixels)
    assert scaled["image"].dtype == jnp.float32 and scaled["image"].sharding.spec == batch["label"].sharding.spec
    assert np.asarray(scaled["image"]).tobytes() == (pixels["image"].astype(np.float32) / 255.0).tobytes()
    # prefetch_to_device: every item, in order, in global form (tuples of batches too).
    items = [({"label": np.full(8, i, np.int32)}, {"label": np.full(8, -i, np.int32)}) for i in range(5)]
    got = list(parallel.prefetch_to_device(iter(items), mesh, size=2))
    assert [(int(a["label"][0]), int(b["label"][7])) for a, b in got] == [(i, -i) for i in range(5)]
    assert all(len(a["label"].sharding.device_set) == 4 for a, _ in got)
    print("OK")
""")


def test_batches_shard_over_the_data_axis_and_bad_sizes_are_refused():
    # XLA_FLAGS as tests/conftest.py set it for the suite (its fast compile), with 4 host devices.
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {os.environ['XLA_FLAGS']}",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-2000:]
