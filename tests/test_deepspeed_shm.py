"""DeepSpeed's CPU allreduce buffer is unlinked after initialisation (it never is by DeepSpeed)."""

from __future__ import annotations

import os

from beitdist.engines.deepspeed import shm as deepspeed_shm


def test_buffer_name_follows_deepspeed_and_is_released_once(tmp_path):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    path = deepspeed_shm.buffer_path(1, env, tmp_path)
    assert path.name == f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29500_1"
    path.write_bytes(b"x")
    mapped = path.open("rb")  # another rank that mapped it keeps reading after the unlink
    assert deepspeed_shm.release_buffer(1, env, tmp_path) and not path.exists()
    assert mapped.read() == b"x"
    mapped.close()
    assert deepspeed_shm.release_buffer(1, env, tmp_path) is False
