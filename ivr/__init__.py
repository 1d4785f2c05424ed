"""The phone channel: the FastAGI protocol on Twisted (`agi`), the French results call flow
(`call_flow`, its inputs declared as data in `inputs`), the prompt catalog and number speech
(`prompts`, `sounds`), the Redis-held lockouts and resume state (`call_state`), and the server
that ties them to the journal and the relay (`server`, `cli`).
"""
