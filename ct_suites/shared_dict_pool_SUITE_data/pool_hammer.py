"""What shared_dict_pool_SUITE's random-kill case runs in every port: counters and sets on
one shared dict, acknowledged only by the reply of the call."""
import os

from erlang import SharedDict


def step(sd, me, i):
    d = SharedDict(sd)
    d.incr("c_" + me)
    d["k_%s_%d" % (me, i)] = i
    return i


def where():
    return os.getpid()
