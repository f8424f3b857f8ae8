"""Training loops. `ppo` covers every on-policy estimator (PPO/GAE, REINFORCE++, GRPO, RLOO, ...)."""
