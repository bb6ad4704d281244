"""Pure building blocks shared by fedseal's server and client sides.

Nothing in this package imports ``server``, ``client``, ``policies`` or
``simulations``; protocol and accounting code here performs no I/O.
"""
