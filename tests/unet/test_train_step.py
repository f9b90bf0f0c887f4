"""The training step that also returns its logits updates the weights exactly as MindSpore's
``nn.TrainOneStepCell`` does, and its logits are the forward pass that produced the loss."""
import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

from unet.data import read_grey
from unet.model import UNet
from unet.recipes import PRESETS
from unet.train import make_loss, make_train_step


@pytest.mark.parametrize("loss", ["bce", "bce_dice"])
def test_train_step_matches_train_one_step_cell(frames, loss):
    ms.set_context(mode=ms.GRAPH_MODE)
    recipe = PRESETS["smoke"].replace(loss=loss)
    (img_path, mask_path), = frames["train"][:1]
    x = ms.Tensor((read_grey(img_path)[None, None, :32, :32] / 255.0).astype(np.float32).repeat(2, axis=0))
    y = ms.Tensor((read_grey(mask_path)[None, None, :32, :32] > 127).astype(np.float32).repeat(2, axis=0))

    def build():
        ms.set_seed(0)
        net = UNet(1, 4)
        return net, nn.Adam(net.trainable_params(), learning_rate=1e-2)

    net_a, opt_a = build()
    net_b, opt_b = build()
    ours = make_train_step(net_a, recipe, opt_a)
    theirs = nn.TrainOneStepCell(nn.WithLossCell(net_b, make_loss(recipe)), opt_b)
    ours.set_train(True)
    theirs.set_train(True)
    for _ in range(3):
        loss_a, logits = ours(x, y)
        loss_b = theirs(x, y)
        assert float(loss_a.asnumpy()) == pytest.approx(float(loss_b.asnumpy()), rel=1e-5)
        assert logits.shape == (2, 1, 32, 32)
        again = make_loss(recipe)(logits, y)  # the logits are the ones the loss was computed from
        assert float(again.asnumpy()) == pytest.approx(float(loss_a.asnumpy()), rel=1e-5)
    for pa, pb in zip(net_a.get_parameters(), net_b.get_parameters()):
        assert pa.name == pb.name
        np.testing.assert_allclose(pa.asnumpy(), pb.asnumpy(), rtol=1e-4, atol=1e-6, err_msg=pa.name)
    assert not np.allclose(net_a.enc1.block[0].weight.asnumpy(), build()[0].enc1.block[0].weight.asnumpy())


def test_boundary_weighted_loss(frames):
    (img_path, mask_path), = frames["train"][:1]
    rng = np.random.default_rng(0)
    logits = ms.Tensor(rng.normal(size=(2, 1, 32, 32)).astype(np.float32))
    y = (read_grey(mask_path)[None, None, :32, :32] > 127).astype(np.float32).repeat(2, axis=0)
    plain = make_loss(PRESETS["fullres"].replace(boundary_weight=0.0))
    weighted = make_loss(PRESETS["fullres"].replace(boundary_weight=10.0))
    # all weights 1: the plain loss
    ones = ms.Tensor(np.concatenate([y, np.ones_like(y)], axis=1))
    assert float(weighted(logits, ones).asnumpy()) == pytest.approx(float(plain(logits, ms.Tensor(y)).asnumpy()),
                                                                    rel=1e-5)
    # weight only on the pixels the logits get wrong: the BCE term grows
    wrong = ((logits.asnumpy() >= 0) != (y > 0.5)).astype(np.float32)
    heavy = ms.Tensor(np.concatenate([y, 1 + 10 * wrong], axis=1))
    assert float(weighted(logits, heavy).asnumpy()) > float(weighted(logits, ones).asnumpy()) + 0.1


def test_boundary_weight_needs_the_dice_loss():
    with pytest.raises(ValueError, match="boundary_weight needs loss 'bce_dice'"):
        PRESETS["seed"].replace(boundary_weight=10.0)
