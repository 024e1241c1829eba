"""Talk to a memory model: `python -m lightmem_exp.serve` (an OpenAI-compatible server) and `lightmem_exp.ask`."""
