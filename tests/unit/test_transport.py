"""The hidden-state channel: bf16 bits through the Ray object store reach the consumer as a zero-copy,
read-only view of shared memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdscale.teacher.base import TeacherOutput
from kdscale.transport.channel import InProcessChannel


def _mapping_of(address: int) -> str:
    """The /proc/self/maps line of the mapping that holds ``address``."""
    for line in open("/proc/self/maps").read().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= address < hi:
            return line
    return ""


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_teacher_output_round_trip(dtype):
    hidden = torch.randn(7, 5)
    out = TeacherOutput.from_tensor(hidden, dtype)
    assert out.array.dtype == (np.int16 if dtype == "bfloat16" else np.float32)
    assert out.nbytes == 7 * 5 * (2 if dtype == "bfloat16" else 4)
    back = InProcessChannel().get([out])[0]
    expected = hidden.to(torch.bfloat16) if dtype == "bfloat16" else hidden
    assert back.dtype == expected.dtype and torch.equal(back, expected)
    assert back.data_ptr() == out.array.__array_interface__["data"][0]  # a view, not a copy


def test_unknown_transport_dtype_is_rejected():
    with pytest.raises(ValueError, match="transport dtype must be one of"):
        TeacherOutput.from_tensor(torch.zeros(1, 1), "float16")


def test_ray_object_store_read_is_zero_copy_and_read_only(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Producer:
        def make(self, seed: int):
            from kdscale.transport.channel import RayObjectStoreChannel

            gen = torch.Generator().manual_seed(seed)
            output = TeacherOutput.from_tensor(torch.randn(256, 64, generator=gen), "bfloat16")
            return RayObjectStoreChannel().put(output)  # as the teacher replica does

    @ray.remote(num_cpus=0)
    class Consumer:
        def inspect(self, refs):
            from kdscale.transport.channel import RayObjectStoreChannel

            channel = RayObjectStoreChannel(timeout_s=60)
            tensor = channel.get(refs)[0]
            array = ray.get(refs[0])
            again = channel.get(refs)[0]
            addr = tensor.data_ptr()
            return {
                "owndata": array.array.flags.owndata,
                "writeable": array.array.flags.writeable,
                "tensor_is_view_of_array": addr == array.array.__array_interface__["data"][0],
                "same_memory_on_second_get": addr == again.data_ptr(),
                "mapping": _mapping_of(addr),
                "bytes": channel.last_get_bytes,
                "checksum": float(tensor.float().sum()),
                "dtype": str(tensor.dtype),
            }

    producer, consumer = Producer.remote(), Consumer.remote()
    ref = ray.get(producer.make.remote(0), timeout=120)  # the producer hands back a ref to route
    info = ray.get(consumer.inspect.remote([ref]), timeout=120)
    expected = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert info["dtype"] == "torch.bfloat16"
    assert info["checksum"] == pytest.approx(float(expected.float().sum()), rel=1e-6)
    assert info["bytes"] == 256 * 64 * 2
    assert info["owndata"] is False  # the array does not own its data ...
    assert info["writeable"] is False  # ... and cannot be written
    assert info["tensor_is_view_of_array"] and info["same_memory_on_second_get"]
    # ... because it is the object store's shared memory mapped into the consumer: no byte was copied there.
    assert "rw-s" in info["mapping"] or " r--s " in info["mapping"], info["mapping"]
    assert "plasma" in info["mapping"] or "/dev/shm" in info["mapping"], info["mapping"]
