import pytest
import torch

from alexnet_mlflow.config import ACTIVATIONS
from alexnet_mlflow.model import AlexNet, Normalize, count_parameters, forward_flops

# Weights + biases of the five 3x3 convolutions (2,251,584) and FC 4096-4096-4096-10 (33,603,594).
CONV_PARAMS = 1728 + 64 + 110592 + 192 + 663552 + 384 + 884736 + 256 + 589824 + 256
FC_PARAMS = (4096 * 4096 + 4096) * 2 + 4096 * 10 + 10
BN_PARAMS = 2 * (64 + 192 + 384 + 256 + 256)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_output_shape_and_parameter_count(activation, batch_norm):
    model = AlexNet(activation=activation, batch_norm=batch_norm).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    logits = model(images)
    assert logits.shape == (3, 10) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert count_parameters(model) == CONV_PARAMS + FC_PARAMS + (BN_PARAMS if batch_norm else 0)


def test_parameter_count_is_the_reports_35_9m():
    assert count_parameters(AlexNet()) == 35_855_178


def test_activation_is_applied_after_every_conv_and_hidden_fc():
    model = AlexNet(activation="sigmoid")
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.modules()) == 5 + 2


def test_batch_norm_follows_every_conv():
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in AlexNet(batch_norm=True).modules()) == 5
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in AlexNet().modules())


def test_dropout_is_active_only_in_training():
    model = AlexNet(dropout=0.5)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    model.eval()
    assert torch.equal(model(images), model(images))
    model.train()
    assert not torch.equal(model(images), model(images))


def test_normalize_maps_pixels_like_torchvision():
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8)
    expected = (pixels.float() / 255 - 0.5) / 0.5
    assert torch.allclose(Normalize(0.5, 0.5)(pixels), expected, atol=1e-6)


def test_forward_flops_count_convs_and_linears():
    # 2 FLOPs per multiply-add: convs 2*(64*3*9*32*32 + 192*64*9*16*16 + 384*192*9*8*8 + 256*384*9*8*8
    # + 256*256*9*8*8) + linears 2*(4096*4096*2 + 4096*10) = 401,031,168
    assert forward_flops(AlexNet()) == 401_031_168
