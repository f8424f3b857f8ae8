"""The option names the config accepts are exactly the ones the algorithm library implements."""

from __future__ import annotations

from hpc_rlhf import algos
from hpc_rlhf.config import schema as config


def test_config_choices_match_the_library():
    assert config.ADVANTAGE_ESTIMATORS == algos.ADVANTAGE_ESTIMATORS
    assert config.GROUP_ESTIMATORS == algos.GROUP_ESTIMATORS
    assert config.KL_ESTIMATORS == algos.KL_ESTIMATORS
    assert config.LOSS_AGG_MODES == algos.LOSS_AGG_MODES
    assert config.OFF_POLICY_CORRECTIONS == algos.OFF_POLICY_CORRECTIONS
    policy_loss_choices = config.AlgoConfig.__dataclass_fields__["policy_loss_type"].metadata["choices"]
    assert tuple(policy_loss_choices) == algos.POLICY_LOSS_TYPES


def test_default_algo_config_values_are_accepted_by_the_library():
    defaults = config.AlgoConfig()
    assert defaults.advantage_estimator in algos.ADVANTAGE_ESTIMATORS
    algos.build_kl_controller(defaults.init_kl_coef, defaults.kl_target, defaults.kl_horizon)
