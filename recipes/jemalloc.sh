# Sourced by the training recipes (after `cd` to the repository root): their Python processes allocate with
# jemalloc when it is installed (Debian / Ubuntu: apt-get install libjemalloc2). TensorFlow's runtime, the traced
# train function and tf.data fragment glibc's malloc; with jemalloc preloaded the peak RSS of a 256-px batch-16
# training step is lower (bench/RESULTS.md, "Training memory (issue 26)"), the arithmetic is the same.
# JEMALLOC=none turns it off; JEMALLOC=/path/libjemalloc.so.2 names another build.
JEMALLOC=${JEMALLOC:-/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2}
if [[ $JEMALLOC != none && -f $JEMALLOC ]]; then
  export LD_PRELOAD="$JEMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"
elif [[ $JEMALLOC != none ]]; then
  echo "recipes/jemalloc.sh: no $JEMALLOC (apt-get install libjemalloc2): training with glibc's malloc," \
       "which peaks higher (bench/RESULTS.md, Training memory)" >&2
fi
