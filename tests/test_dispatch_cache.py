"""The server's dispatcher asks what a compute() takes once per function (the answer
is cached, weakly): the answers, for every kind of callable, and that the cache
keeps no function alive."""
import gc
import weakref

import pytest

from splitlearn_comm import server as server_mod

pytestmark = pytest.mark.timeout(30)

KV = ("past_key_values", "use_cache")


class WithCache:
    def compute(self, x, past_key_values=None, use_cache=False):
        return x


class Plain:
    def compute(self, x):
        return x


class AnyKeywords:
    def compute(self, x, **kwargs):
        return x


class Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __call__(self, x, past_key_values=None, use_cache=False):
        return x


def test_answers_for_each_kind_of_callable():
    for _ in range(2):  # the second round answers from the cache
        assert server_mod._takes(WithCache().compute, *KV) is True
        assert server_mod._takes(Plain().compute, *KV) is False
        assert server_mod._takes(AnyKeywords().compute, *KV) is True
        assert server_mod._takes(Unhashable(), *KV) is True
        assert server_mod._takes(lambda x, use_cache=None: x, *KV) is False
        assert server_mod._takes(print, *KV) is False  # a builtin: no signature to trust


def test_one_function_answers_per_set_of_names():
    fn = WithCache().compute
    assert server_mod._takes(fn, "past_key_values") is True
    assert server_mod._takes(fn, "other") is False
    assert server_mod._takes(fn, *KV) is True


def test_the_cache_holds_functions_weakly():
    def make():
        class Temp:
            def compute(self, x, past_key_values=None, use_cache=False):
                return x
        return Temp

    cls = make()
    assert server_mod._takes(cls().compute, *KV) is True
    func = cls.compute
    assert func in server_mod._takes_cache
    ref = weakref.ref(func)
    n = len(server_mod._takes_cache)
    del cls, func
    gc.collect()
    # the entry went with the function (other garbage of earlier tests may go in
    # the same collection, so the size can drop by more than one)
    assert ref() is None
    assert len(server_mod._takes_cache) <= n - 1
