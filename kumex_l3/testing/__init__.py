"""Development tools that tests, benchmarks, chaos scenarios and ``make demo`` share.

Not part of what the services run (nothing in ``kumex_l3`` or ``services`` imports
this package, except the demo runner):

* :mod:`~kumex_l3.testing.devredis`: a throwaway ``redis-server`` on a free port;
* :mod:`~kumex_l3.testing.synthetic`: a seeded generator of valid level3v2 streams
  (pure);
* :mod:`~kumex_l3.testing.procs`: a service as a child process (``python -m``), with
  its log kept, and the waiting helpers;
* :mod:`~kumex_l3.testing.sandbox_proc`: the sandbox exchange as a child process,
  and the demo keys it knows.
"""
