"""ADRPO pieces: expert trajectories, rollouts, rewards, advantages, the policy loss, answerers, reward service."""
