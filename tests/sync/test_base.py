"""The strategy registry: what `register` demands, how config and `create` find a strategy,
and what the registered strategies declare."""

from dataclasses import dataclass

import pytest

from mpitrain import config
from mpitrain.errors import UserError
from mpitrain.options import opt
from mpitrain.sync import REGISTRY, Reporting, Stateful, create, register, roles
from mpitrain.sync.base import RankStateful


@dataclass(frozen=True)
class _Options:
    period: int = opt(2, gt=0)


def test_register_demands_options_and_sums_gradients():
    for attrs, missing in (({"sums_gradients": True}, "Options"), ({"Options": _Options}, "sums_gradients")):
        with pytest.raises(TypeError, match=f"must declare {missing}"):
            register("t_incomplete")(type("Incomplete", (), attrs))
    assert "t_incomplete" not in REGISTRY


def test_a_registered_strategy_is_configurable_and_created(world):
    try:
        @register("t_dummy")
        class Dummy:
            Options = _Options
            sums_gradients = False
            replicas_differ = True

            def __init__(self, options, world, log=None):
                self.options, self.world = options, world

        assert Dummy.name == "t_dummy" and Dummy.uneven_steps is False and REGISTRY["t_dummy"] is Dummy
        cfg = config.from_dict({"sync": {"strategy": "t_dummy", "t_dummy": {"period": 3}}})
        assert cfg.sync.options == _Options(3)
        strategy = create(cfg.sync, world)
        assert isinstance(strategy, Dummy) and strategy.options.period == 3 and strategy.world is world
        assert roles(cfg.sync, world) == (world, None)  # no roles function: every rank trains
        with pytest.raises(UserError, match=r"sync\.t_dummy\.period: expected a value > 0"):
            config.from_dict({"sync": {"strategy": "t_dummy", "t_dummy": {"period": 0}}})
    finally:
        REGISTRY.pop("t_dummy", None)


def test_create_names_an_unknown_strategy(world):
    @dataclass(frozen=True)
    class Spec:
        strategy: str = "gossip"
        options: object = None

    with pytest.raises(UserError, match="unknown strategy 'gossip'"):
        create(Spec(), world)


def test_what_the_strategies_declare():
    assert set(REGISTRY) >= {"allreduce", "ps_sync", "ssp", "async", "local_sgd", "post_local_sgd", "bmuf",
                             "easgd", "easgd_async"}
    # combined gradients (loss weighted by 1/global batch) vs each rank on its own gradient
    assert {n for n in ("allreduce", "ps_sync", "ssp", "async") if REGISTRY[n].sums_gradients} == \
        {"allreduce", "ps_sync", "ssp", "async"}
    assert not any(REGISTRY[n].sums_gradients for n in ("local_sgd", "post_local_sgd", "bmuf", "easgd",
                                                         "easgd_async"))
    assert REGISTRY["async"].uneven_steps and not REGISTRY["allreduce"].uneven_steps
    for n in ("ps_sync", "ssp", "async"):  # they report staleness, and checkpoint the store
        assert issubclass(REGISTRY[n], Reporting) and issubclass(REGISTRY[n], Stateful)
    for n in ("bmuf", "easgd", "easgd_async"):  # replicated / stored state beyond the model
        assert issubclass(REGISTRY[n], Stateful)
    # allreduce: state only with a stateful compressor (PowerSGD's Q; residuals per rank)
    assert issubclass(REGISTRY["allreduce"], Stateful) and issubclass(REGISTRY["allreduce"], RankStateful)
