"""Tools apart from serving, each with its command line (`main`): checkpoints (`make_checkpoint`,
and the demo task's `shapes`), the engine's benchmark (`bench`), the soak test (`soak`),
perf_analyzer's input data and run (`perf`), a checkpoint's sizing (`sizing`) and the demo
(`demo`). They use the serving libraries (client, launch, engine, model); nothing that serves
imports them.
"""
