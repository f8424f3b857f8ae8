"""The PPO-family trainer: `recipe.run_ppo` wires components, `loop` runs the schedule, the rest are its stages."""
