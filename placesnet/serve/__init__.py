"""The Serve endpoint's library, one job per module; ``build_app`` in ``serving/app.py`` builds the
Ray Serve app from it.

options   ServeOptions: build_app's arguments, typed and checked once, and the limits they set
errors    ClientError: a refused request, its HTTP status and reason, and that status's gRPC code
metrics   EndpointMetrics: the endpoint's own Prometheus metrics, one per replica
auth      the optional bearer token: where a replica finds its key, how a header is checked
body      a POST /predict body -> its uploads (the raw body, or multipart ``file`` fields)
served    ServedModel: one checkpoint as a replica serves it, verified, loaded and probed
replica   one replica: its model and the swap to the next, decoding, batching, and the one predict
          HTTP and gRPC both call
grpc_api  the gRPC method of serving/scene.proto
http_api  the Serve deployment: its FastAPI routes and JSON errors, the gRPC method, reconfigure
rollout   the operator's side: the checkpoint to serve, resolved and verified once; `serve run` kept
          off a live endpoint; promote, a checkpoint swapped into the running app in place
"""
