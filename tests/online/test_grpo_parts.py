"""GRPO's advantages and sample selection, the prompt stream and the cross-process redistribution, without models."""

import os
import sys

import numpy as np
import pytest
import torch

from fastpref.config import ConfigError, from_dict
from fastpref.data.prompts import Prompt
from fastpref.online.config import OnlineConfig
from fastpref.online.grpo import group_advantages
from fastpref.online.rollout import PromptStream, RolloutPrompts, gather_permute_split, global_sample_keys


def flow_grpo_advantages(rewards, prompts, global_std):
    """The reference code's PerPromptStatTracker.update written out element by element."""
    out = []
    for i, r in enumerate(rewards):
        same = [rewards[j] for j in range(len(rewards)) if prompts[j] == prompts[i]]
        mean = sum(same) / len(same)
        pool = rewards if global_std else same
        m = sum(pool) / len(pool)
        std = (sum((x - m) ** 2 for x in pool) / len(pool)) ** 0.5
        out.append((r - mean) / (std + 1e-4))
    return out


@pytest.mark.parametrize("global_std", [True, False])
def test_group_advantages_are_flow_grpos(global_std):
    rng = np.random.default_rng(0)
    prompts = ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["a"] * 2  # a prompt text repeated under another id pools
    rewards = rng.random(len(prompts)).round(1)
    rewards[8:12] = 0.5  # a prompt whose images tie: advantage 0
    got, stats = group_advantages(rewards, prompts, stat_tracking=True, global_std=global_std)
    np.testing.assert_allclose(got, flow_grpo_advantages(list(rewards), prompts, global_std), rtol=1e-12)
    assert (got[8:12] == 0).all()
    assert stats["zero_std_ratio"] == pytest.approx(1 / 3)
    groups = {text: [r for r, t in zip(rewards, prompts) if t == text] for text in ("a", "b", "c")}
    stds = [float(np.std(v)) for v in groups.values()]
    assert stats["reward_std_mean"] == pytest.approx(np.mean(stds))
    assert stats["reward_std_max"] == pytest.approx(max(stds)) and stats["reward_std_max"] > stats["reward_std_mean"]
    assert stats["reward_group_mean_std"] == pytest.approx(np.std([np.mean(v) for v in groups.values()]))


def test_group_advantages_without_stat_tracking_use_the_batch():
    rewards = np.array([0.0, 1.0, 2.0, 5.0])
    got, _ = group_advantages(rewards, ["a", "a", "b", "b"], stat_tracking=False)
    np.testing.assert_allclose(got, (rewards - 2.0) / (np.std(rewards, ddof=1) + 1e-4))


def prompts_of(n):
    return [Prompt(f"p{i:03d}", f"caption {i}") for i in range(n)]


def test_prompt_stream_orders_each_epoch_and_resumes():
    stream = PromptStream(prompts_of(10), seed=3, per_rollout=4)
    batches = [stream.next() for _ in range(5)]
    assert [(b.epoch, b.start) for b in batches] == [(0, 0), (0, 4), (1, 0), (1, 4), (2, 0)]  # partial dropped
    assert len({p.id for b in batches[:2] for p in b.prompts}) == 8
    assert batches[0].ids != batches[2].ids  # a fresh order every epoch
    again = PromptStream(prompts_of(10), seed=3, per_rollout=4)
    again.load_state_dict({"epoch": 1, "position": 4})
    assert again.next().ids == batches[3].ids
    assert PromptStream(prompts_of(10), seed=4, per_rollout=4).next().ids != batches[0].ids


def test_shards_and_keys_cover_the_rollout_once():
    batch = RolloutPrompts(2, 8, prompts_of(6))
    shards = [batch.shard(r, 3) for r in range(3)]
    assert sum((s.prompts for s in shards), []) == batch.prompts
    keys = torch.cat([global_sample_keys(s, 4) for s in shards])
    assert torch.equal(keys, global_sample_keys(batch, 4))
    assert torch.equal(keys, torch.arange(32, 32 + 24))
    with pytest.raises(ValueError):
        batch.shard(0, 4)


def test_gather_permute_split_on_one_process():
    rows = {"x": torch.arange(11.0)[:, None].repeat(1, 3), "y": torch.arange(11)}
    keys = torch.arange(100, 111)
    parts = gather_permute_split(rows, keys, torch.Generator().manual_seed(0), parts=2)
    assert [len(p["y"]) for p in parts] == [5, 5]  # the largest multiple of parts x world: one row dropped
    taken = torch.cat([p["y"] for p in parts])
    assert len(set(taken.tolist())) == 10
    assert torch.equal(parts[0]["x"][:, 0].long(), parts[0]["y"])
    # the order does not depend on the order the rows come in: only on the keys
    flipped = gather_permute_split({k: v.flip(0) for k, v in rows.items()}, keys.flip(0),
                                   torch.Generator().manual_seed(0), parts=2)
    assert all(torch.equal(a["y"], b["y"]) for a, b in zip(parts, flipped))
    with pytest.raises(ValueError, match="unique"):
        gather_permute_split(rows, torch.zeros(11, dtype=torch.long), torch.Generator().manual_seed(0))


def _worker(rank, world, path, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=path)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    keys = torch.arange(12)[rank::world]  # interleaved: the gathered order is not the key order
    rows = {"y": keys * 10, "z": keys[:, None].float().repeat(1, 2)}
    parts = gather_permute_split(rows, keys, torch.Generator().manual_seed(5), parts=2)
    queue.put((rank, [p["y"].tolist() for p in parts]))
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_gather_permute_split_two_processes_equal_one():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = gather_permute_split({"y": torch.arange(12) * 10}, torch.arange(12), torch.Generator().manual_seed(5),
                                  parts=2)
    for k in range(2):
        whole = single[k]["y"].tolist()
        assert results[0][k] + results[1][k] == whole  # rank 0 takes the first half of each part


def test_online_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="grpo.clip_range"):
        from_dict(OnlineConfig, {"grpo": {"clip_range": 0}})
    with pytest.raises(ConfigError, match="reward.nope"):
        from_dict(OnlineConfig, {"reward": {"nope": 1.0}})
    with pytest.raises(ConfigError, match="reward_paths.pickscore"):
        from_dict(OnlineConfig, {"reward_paths": {"pickscore": "x"}})
    cfg = from_dict(OnlineConfig, {"prompts_per_rollout": 3, "group_size": 1})
    with pytest.raises(ConfigError, match="online.prompts_per_rollout"):
        cfg.check_method("grpo", world_size=2)
    with pytest.raises(ConfigError, match="online.group_size"):
        cfg.check_method("grpo", world_size=1)
    cfg = from_dict(OnlineConfig, {"prompts_per_rollout": 3, "group_size": 3, "grpo": {"steps_per_rollout": 2}})
    with pytest.raises(ConfigError, match="online.grpo.steps_per_rollout"):
        cfg.check_method("grpo", world_size=1)


def test_train_config_online_section_only_for_online_objectives():
    from fastpref.train.config import TrainConfig

    with pytest.raises(ConfigError, match="online: set, but objective.name 'rankdpo'"):
        from_dict(TrainConfig, {"data": {"root": "x"}, "online": {"group_size": 3}})
    with pytest.raises(ConfigError, match="data.root"):
        from_dict(TrainConfig, {"objective": {"name": "dpo"}})
    cfg = from_dict(TrainConfig, {"objective": {"name": "grpo"}, "online": {"grpo": {"kl_beta": 0.04}}})
    assert cfg.online.grpo.kl_beta == 0.04 and not cfg.data.root  # online methods need no dataset


def test_kept_samples_fill_to_an_even_split():
    from types import SimpleNamespace

    from fastpref.online.config import GRPOConfig
    from fastpref.online.grpo import GRPOMethod

    method = GRPOMethod.__new__(GRPOMethod)
    method.cfg = GRPOConfig(steps_per_rollout=2)
    method.engine = SimpleNamespace(world_size=2, seed=0)
    advantages = torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 1.0, 0.0, -1.0, 0.3, 0.0, 0.0, 0.0])
    batch = RolloutPrompts(0, 0, prompts_of(3))
    keep = method._kept_samples(advantages, batch)
    assert keep[advantages != 0].all() and int(keep.sum()) == 8  # 5 nonzero + 3 zero ones -> a multiple of 4
    assert torch.equal(keep, method._kept_samples(advantages, batch))  # the same choice on every process
    method.cfg = GRPOConfig(steps_per_rollout=2, drop_zero_advantage=False)
    assert method._kept_samples(advantages, batch).all()
