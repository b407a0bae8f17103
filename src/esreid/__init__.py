"""esreid: person and vehicle re-identification with ES-Net.

ES-Net ("Erasing Salient Parts to Learn More in Re-Identification") is a two-branch
ResNet-50: the All Information Branch sees whole images, the Erasing Salient Branch sees
images whose most salient pixels (found with CG-RAM) were erased, pooled with P-pooling.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from esreid import ReIDModel`` without making ``import esreid`` load torch.
    if name == "ReIDModel":
        from esreid.inference import ReIDModel

        return ReIDModel
    raise AttributeError(f"module 'esreid' has no attribute {name!r}")
