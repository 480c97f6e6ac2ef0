"""The supervisor: PID 1, the one arbiter, a reconciliation loop.

A signal handler only queues its signal and wakes the loop (set_wakeup_fd). Each signal or control
command only changes the *desired* state: slot counts, generation, paused, stopping + deadline.
One `reconcile()` step then reaps every child and converges the process table toward that state,
so scaling, reload, drain and crash recovery need no special paths of their own. The supervisor
never imports the application: a fork of it is a clean interpreter that becomes the next mold.

One class, in parts that each have one job (state.py types what they share):
lifecycle.py (the loop), desired.py (what commands change), converge.py (workers toward it),
exits.py (reaping), molds.py (the mold link), agent_link.py (the agent link), reports.py (what
workers say, what commands read).
"""

from resque_starter.supervisor.agent_link import AgentLink
from resque_starter.supervisor.converge import Converge
from resque_starter.supervisor.desired import DesiredState
from resque_starter.supervisor.exits import Exits
from resque_starter.supervisor.lifecycle import Lifecycle
from resque_starter.supervisor.molds import MoldLink
from resque_starter.supervisor.reports import Reports

__all__ = ["Supervisor"]


class Supervisor(Lifecycle, DesiredState, Converge, Exits, MoldLink, AgentLink, Reports):
    """The supervisor, made of its parts; `run()` (lifecycle.py) is its whole life."""
