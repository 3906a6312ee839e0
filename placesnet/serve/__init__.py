"""The Serve endpoint's library, one job per module; ``build_app`` in ``serving/app.py`` builds the
Ray Serve app from it.

options   ServeOptions: build_app's arguments, typed and checked once, and the limits they set
errors    ClientError: a refused request, its HTTP status, and that status's gRPC code (one table)
auth      the optional bearer token: where a replica finds its key, how a header is checked
body      a POST /predict body -> its uploads (the raw body, or multipart ``file`` fields)
replica   one replica: the model, decoding, batching, and the one predict HTTP and gRPC both call
grpc_api  the gRPC method of serving/scene.proto
http_api  the Serve deployment: its FastAPI routes and JSON errors, and the gRPC method
"""
