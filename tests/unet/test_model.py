import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms

from unet.model import UNet, count_parameters


def test_case_network_has_31_4_million_parameters():
    n = count_parameters(UNet(in_channels=3, base_channels=64))
    assert abs(n - 31.4e6) / 31.4e6 < 0.01, n


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (1, 1, 50, 70), (1, 3, 33, 17)])
def test_output_has_input_size_and_one_channel(shape):
    net = UNet(in_channels=shape[1], base_channels=4)
    net.set_train(False)
    y = net(ms.Tensor(np.random.default_rng(0).random(shape, dtype=np.float32)))
    assert y.shape == (shape[0], 1, shape[2], shape[3])
    assert np.isfinite(y.asnumpy()).all()


def test_rejects_bad_widths():
    with pytest.raises(ValueError, match="base_channels"):
        UNet(in_channels=1, base_channels=0)


def test_import_unet_does_not_import_prefect_or_mindspore():
    code = "import sys, unet, unet.recipes; print('prefect' in sys.modules, 'mindspore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_onednn_isa_cap_is_set_but_user_value_kept():
    code = "import os, unet; print(os.environ['ONEDNN_MAX_CPU_ISA'])"
    env_default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={"PATH": "/usr/bin:/bin"}).stdout.strip()
    env_user = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PATH": "/usr/bin:/bin", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}).stdout.strip()
    assert (env_default, env_user) == ("AVX2", "AVX512_CORE")
