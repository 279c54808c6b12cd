"""Benchmarks and tools (`verispec bench`, `verispec synth`).

Tools are clients of the service's parts: they load models, drive engines and call the server as a user
would. The CLI imports them lazily, only once their command is chosen (argument definitions excepted:
those modules import nothing heavy at top level); the service core never imports them.
"""
