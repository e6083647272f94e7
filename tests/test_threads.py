"""Intra-op thread counts: few_threads around loops of tiny ops, every_thread for a large op inside one."""

import torch

from slim2gguf.threads import every_thread, few_threads


def test_every_thread_gives_back_the_threads_few_threads_took_and_nothing_else():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with every_thread():  # outside few_threads: nothing to give back
            assert torch.get_num_threads() == 2
        with few_threads(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            with every_thread():
                assert torch.get_num_threads() == 2
                with every_thread():  # nested: already every thread
                    assert torch.get_num_threads() == 2
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with few_threads(torch.device("meta")), every_thread():  # not a CPU: neither changes the count
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_every_thread_restores_one_thread_when_its_op_fails():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with few_threads(torch.device("cpu")):
            try:
                with every_thread():
                    raise RuntimeError("an op failed")
            except RuntimeError:
                pass
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
