"""Learning rates left to None are settled by the reference: a model built from scratch keeps the embedded
default's large rate, a pretrained checkpoint gets a small one that does not wreck it."""

from tidpo_core.models.contrastive import ContrastiveSFT
from tidpo_core.models.reward import RewardTraining
from tidpo_core.steps.reward import RewardModelSettings


def test_the_reward_models_rate_follows_the_backbone_unless_given():
    assert RewardTraining().settled(pretrained=False).learning_rate == 1e-3
    assert RewardTraining().settled(pretrained=True).learning_rate == 1e-5
    assert RewardTraining(learning_rate=3e-4).settled(pretrained=True).learning_rate == 3e-4
    settled = RewardModelSettings(min_accuracy_margin=0.2).settled(pretrained=True)
    assert (
        isinstance(settled, RewardModelSettings)
        and settled.min_accuracy_margin == 0.2
        and settled.learning_rate == 1e-5
    )


def test_the_contrastive_models_rate_follows_the_base_unless_given():
    assert ContrastiveSFT().settled(pretrained=False).sft_learning_rate == 3e-3
    assert ContrastiveSFT().settled(pretrained=True).sft_learning_rate == 2e-5
    assert ContrastiveSFT(sft_learning_rate=1e-4).settled(pretrained=True).sft_learning_rate == 1e-4
