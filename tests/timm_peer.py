"""timm's ``hrnet_*`` as a peer of our body: the tests' independent oracle.

timm's HRNet has the official module names, so its state dict (minus the classification
head) loads into ``hrnet_d2.HRNet`` as is.  Test-only (timm is a test dependency); random
weights come from a private ``torch.Generator``, so making a peer leaves the global RNG alone.
"""

import torch

from hrnet_d2.checkpoint.zoo import imagenet_bodies

__all__ = ["TIMM_NAMES", "CLASSIFICATION_ONLY", "body_state_dict", "timm_branches", "random_timm", "calibrated_timm"]

# our architecture name -> timm model name (from the model-zoo table, hrnet_d2.checkpoint.zoo)
TIMM_NAMES = {arch: e.timm_name for arch, e in imagenet_bodies().items()}
# top-level modules of the ImageNet classifier that detection does not use
CLASSIFICATION_ONLY = ("incre_modules", "downsamp_modules", "final_layer", "classifier")


def body_state_dict(timm_model, keep_num_batches_tracked=True):
    """The body part of a timm/official state dict (what loads into ``HRNet``)."""
    return {
        k: v
        for k, v in timm_model.state_dict().items()
        if k.split(".")[0] not in CLASSIFICATION_ONLY
        and (keep_num_batches_tracked or not k.endswith("num_batches_tracked"))
    }


def timm_branches(timm_model, x):
    """timm's stem + stages: the four branch outputs, as our hr2..hr5."""
    t = timm_model
    return t.stages(t.act2(t.bn2(t.conv2(t.act1(t.bn1(t.conv1(x)))))))


def random_timm(arch, seed=0):
    """timm's model for ``arch`` with random weights drawn from a private generator: the same
    weights for the same seed, and the global RNG untouched."""
    import timm

    with torch.random.fork_rng(devices=[]):  # timm's own init draws from the global RNG
        model = timm.create_model(TIMM_NAMES[arch], pretrained=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:  # conv / linear: He-normal, as timm's own init
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("weight"):  # norm scales
                p.fill_(1.0)
            else:
                p.zero_()
    return model


def calibrated_timm(arch, x, seed=0):
    """A random timm body whose BN statistics are those of ``x`` (a train-mode pass), with
    non-trivial affine terms: activations stay normalised, as in a trained network."""
    model = random_timm(arch, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)  # U(0.5, 1.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)  # U(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        timm_branches(model, x)
    return model.eval()
