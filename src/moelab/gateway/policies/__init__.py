"""The gateway's request routers, one file per policy; importing this package registers them
(registry kind ``request_router``). Torch-free."""
