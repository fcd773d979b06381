"""The broker's work for one vhost, counted in Erlang reductions instead of CPU time.

On a shared broker the Erlang VM's CPU time includes every other client's work, and
on a loaded machine it is inflated by contention. A process's reductions (the
scheduler's unit of work: roughly one per function call) count only what that process
did, whatever else ran. `vhost_reductions` reads them, with `rabbitmqctl eval`, for the
processes that serve one vhost: each connection's reader and supervision tree, each
channel's process with its writer and limiter, and each queue's process (a quorum queue's
Ra server). The quorum queues' shared log writer (WAL) and segment writer serve every
vhost and are not counted.
Needs `rabbitmqctl` on the broker's machine; returns None without it.
"""

from __future__ import annotations

import re
import subprocess

from mq_worker.testing import rabbitmqctl

_EVAL = """
V = <<"%s">>,
Tree = fun Tree(Sup) -> [Sup | lists:append([case T of supervisor -> Tree(C); _ -> [C] end
    || {_, C, T, _} <- (catch supervisor:which_children(Sup)), is_pid(C)])] end,
Conns = [C || C <- rabbit_networking:connections(),
    (catch rabbit_reader:info(C, [vhost])) =:= [{vhost, V}]],
Procs = lists:append([case process_info(C, dictionary) of
    {dictionary, D} -> case proplists:get_value('$ancestors', D) of
        [Sup | _] when is_pid(Sup) -> Tree(Sup); _ -> [C] end;
    _ -> [] end || C <- Conns]),
IsSup = fun(L) -> case catch proc_lib:initial_call(L) of
    {M, _, _} when M =:= supervisor; M =:= supervisor2 -> true; _ -> false end end,
Links = fun(P) -> case process_info(P, links) of {links, Ls} -> Ls; _ -> [] end end,
Chans = [Ch || Ch <- rabbit_channel:list(), node(Ch) =:= node(),
    (catch rabbit_channel:info(Ch, [vhost])) =:= [{vhost, V}]],
ChProcs = lists:append([[Ch | lists:append([[C || {_, C, _, _} <- supervisor:which_children(L),
    is_pid(C)] || L <- Links(Ch), is_pid(L), IsSup(L)])] || Ch <- Chans]),
Qs = [case amqqueue:get_pid(Q) of P when is_pid(P) -> P; {N, _} -> whereis(N) end
    || Q <- rabbit_amqqueue:list(V)],
[{pid_to_list(P) ++ " " ++ atom_to_list(element(1, proc_lib:translate_initial_call(P))), R}
    || P <- lists:usort(Procs ++ ChProcs ++ Qs), is_pid(P),
    {reductions, R} <- [process_info(P, reductions)]].
"""
_ROW = re.compile(r'\{"(<[\d.]+>) (\w+)",(\d+)\}')

Reading = dict[str, tuple[str, int]]  # process id: (its module, its reductions so far)


def vhost_reductions(vhost: str) -> Reading | None:
    """Reductions so far of each process serving `vhost`, and what each process is."""
    try:
        out = rabbitmqctl("eval", _EVAL % vhost)
    except (OSError, subprocess.SubprocessError):
        return None
    return {pid: (module, int(count)) for pid, module, count in _ROW.findall(out)}


def reductions_by_module(before: Reading | None, after: Reading | None) -> dict[str, int] | None:
    """Reductions done between two readings by processes alive at the second, summed by
    the module they run (rabbit_reader, rabbit_channel, rabbit_writer, ra_server_proc,
    rabbit_amqqueue_process, ...)."""
    if before is None or after is None:
        return None
    done: dict[str, int] = {}
    for pid, (module, count) in after.items():
        done[module] = done.get(module, 0) + count - before.get(pid, ("", 0))[1]
    return done


def reductions_between(before: Reading | None, after: Reading | None) -> int | None:
    """Reductions done between two readings, by processes alive at the second."""
    by_module = reductions_by_module(before, after)
    return None if by_module is None else sum(by_module.values())
