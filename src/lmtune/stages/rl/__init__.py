"""What the RL stages (ppo, grpo) share: prompts in a resumable order, reward sources, and group sampling.

- prompts.py: the prompt side of any row, and which prompts an iteration rolls out;
- reward_spec.py: `reward_function` settings checked without running them (for `check`);
- rewards.py: reward functions, built-in rewards and reward models, called on rollouts;
- sampling.py: answers sampled with the KV cache, a group per prompt from one computed prompt.
The reference policy they compare against is stages/reference.py, shared with dpo and kto.
"""
