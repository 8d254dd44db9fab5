"""ppo: reinforcement learning from a reward, with rollouts, a value head and a KL leash.

Its recipe (train.py) alternates rollouts with optimisation epochs over them,
so it has its own loop built from the engine's shared parts (engine/run.py):
- rewards.py: where scores come from (an rm run, or a Python function);
- rollout.py: prompts in order, answers sampled with the KV cache, per-token
  log-probabilities, entropies and values;
- objective.py: the KL penalty, GAE, clipped policy and value losses, the
  adaptive KL coefficient and running reward statistics.
"""
