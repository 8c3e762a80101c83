"""Trainers (SFT, reward model, PPO) and the state, loop and model set-up they share."""
