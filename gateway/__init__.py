"""A gateway for image-generation model servers.

README.md is the operator's manual; docs/architecture.md is the design: the request
flow, the module map (what each module owns and may import) and the decisions.
"""

__version__ = "0.1.0"
