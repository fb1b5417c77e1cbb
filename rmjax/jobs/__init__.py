"""The jobs: each one a typed config and one ``run(config)`` (``rmjax/commands`` map flags onto them).

    score        ScoreConfig        bulk scoring: implicit rewards, reward models, judges (resumable)
    vocab_scan   VocabScanConfig    every vocabulary token or word as the reply to the value prompts
    features     FeaturesConfig     a frozen model's features over a corpus (ArmoRM stage 0; resumable)
    eval_rm      EvalConfig         a reward model on any data, RewardBench 1 / 2 by their leaderboards
    armorm       *Config            ArmoRM's stages on feature caches
    logprobs     LogprobsConfig     the top next tokens after a prompt
    serve        ServeConfig        a reward model behind HTTP (OpenRLHF's /get_reward) on the scoring engine
    plan         PlanConfig         a training run compiled ahead of time for a TPU topology, sized
Training: ``rmjax.train.config.TrainConfig`` and ``rmjax.train.loop.run``.
"""
