"""timm's ``hrnet_*`` as a peer of our body: the test oracle and the benchmark baseline.

timm's HRNet has the official module names, so its state dict (minus the classification
head) loads into ``hrnet_d2.HRNet`` as is.  timm is imported only when a model is made:
it is a test/benchmark dependency, not a runtime one.
"""
import torch

from hrnet_d2.zoo import imagenet_bodies

__all__ = ["TIMM_NAMES", "CLASSIFICATION_ONLY", "body_state_dict", "timm_branches", "calibrated_timm"]

# our architecture name -> timm model name (from the model-zoo table, hrnet_d2.zoo)
TIMM_NAMES = {arch: e.timm_name for arch, e in imagenet_bodies().items()}
# top-level modules of the ImageNet classifier that detection does not use
CLASSIFICATION_ONLY = ("incre_modules", "downsamp_modules", "final_layer", "classifier")


def body_state_dict(timm_model, keep_num_batches_tracked=True):
    """The body part of a timm/official state dict (what loads into ``HRNet``)."""
    return {
        k: v
        for k, v in timm_model.state_dict().items()
        if k.split(".")[0] not in CLASSIFICATION_ONLY and (keep_num_batches_tracked or not k.endswith("num_batches_tracked"))
    }


def timm_branches(timm_model, x):
    """timm's stem + stages: the four branch outputs, as our hr2..hr5."""
    t = timm_model
    return t.stages(t.act2(t.bn2(t.conv2(t.act1(t.bn1(t.conv1(x)))))))


def calibrated_timm(arch, x):
    """A random timm body whose BN statistics are those of ``x`` (a train-mode pass), with
    non-trivial affine terms: activations stay normalised, as in a trained network."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAMES[arch], pretrained=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        timm_branches(model, x)
    return model.eval()
