"""Models: ResNet backbones, pooling layers (GAP, GMP, P-pooling), BNNeck and ES-Net."""

from esreid.models.backbone import PretrainedWeightsError, build_resnet
from esreid.models.esnet import Branch, BranchOutput, ESNet, TrainOutput, build_model
from esreid.models.heads import BNNeck
from esreid.models.pooling import GlobalAvgPool, GlobalMaxPool, PPooling, build_pooling

__all__ = [
    "BNNeck",
    "Branch",
    "BranchOutput",
    "ESNet",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "PPooling",
    "PretrainedWeightsError",
    "TrainOutput",
    "build_model",
    "build_pooling",
    "build_resnet",
]
