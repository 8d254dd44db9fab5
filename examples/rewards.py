"""Rule-based rewards for `stage: ppo` and `stage: grpo` (`reward_function: rewards.py:name`).

A reward function gets the prompts and the answers as text (lists of the same
length) and returns one number per answer.
"""

import re


def reversed_digits(prompts, answers):
    """For "Reverse: 1 2 3" prompts: the share of the expected digits in place, less 0.1 per extra digit."""
    out = []
    for prompt, answer in zip(prompts, answers):
        expected = re.findall(r"\d", prompt.split("Reverse", 1)[-1])[::-1]
        got = re.findall(r"\d", answer)
        right = sum(a == b for a, b in zip(expected, got))
        out.append(right / max(len(expected), 1) - 0.1 * max(len(got) - len(expected), 0))
    return out


def digit_share(prompts, answers):
    """The share of an answer's characters (spaces aside) that are digits."""
    out = []
    for answer in answers:
        characters = [c for c in answer if not c.isspace()]
        out.append(sum(c.isdigit() for c in characters) / max(len(characters), 1))
    return out


def short_answer(completions, **kwargs):
    """For `stage: grpo` (called TRL's way, with keywords): 1 for an answer of at most 4 words, less beyond."""
    return [min(1.0, 4 / max(len(c.split()), 1)) for c in completions]
