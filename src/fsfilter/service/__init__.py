"""fsfilterd, the service that runs filter stacks with no application (docs/service.md)."""

__all__: list[str] = []  # the service is a program (fsfilterd); its modules say what they offer
