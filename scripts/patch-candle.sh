#!/usr/bin/env bash
# Makes a private, patched copy of the registry's candle-core for a `[patch.crates-io]` given on the command
# line (nothing third-party is committed). Two edits, each checked so that a new candle version that no longer
# matches fails loudly instead of building unpatched:
#
#  grad  candle's backward starts every gradient it accumulates from a tensor of zeros and adds the first
#        contribution to it: two ops (a full-size memset and a full-size add) for nearly every edge of the
#        graph, where storing the contribution costs none. The edit stores the first contribution itself
#        (made contiguous when it is a view, so later ops see the layouts they saw before) and adds only the
#        later ones; a first contribution that is subtracted is stored negated. The values are the same: 0 + g
#        is g, except that a gradient of -0 is kept as -0. PAIRUNI_GRAD_ACCUMULATE=zeros at run time restores
#        candle's own accumulation.
#  cuda  cudarc switched from `dynamic-linking` to `dynamic-loading`, so that the CUDA libraries are dlopen'ed at
#        run time (scripts/build-cuda.sh).
#
# Usage: scripts/patch-candle.sh DEST_DIR EDITS...   (EDITS: grad, cuda); prints the patched folder.
# DEST_DIR/candle-core-<version> is rebuilt only when the edits asked for differ from the ones it holds.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir=$1
shift
edits="$*"
candle_ver="$(grep -A1 '^name = "candle-core"' "$repo/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p' | head -1)"
candle_ver="${candle_ver:-0.11.1}"
find_src() { ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-"$candle_ver" 2>/dev/null | head -1 || true; }
registry_src="$(find_src)"
if [[ -z "$registry_src" ]]; then
    (cd "$repo" && cargo fetch >/dev/null)
    registry_src="$(find_src)"
fi
patched="$dest_dir/candle-core-$candle_ver"
# The marker names the edits and this script's own checksum, so an edited recipe re-patches.
stamp="$edits $(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if [[ -f "$patched/.pairuni-patched" && "$(cat "$patched/.pairuni-patched")" == "$stamp" ]]; then
    echo "$patched"
    exit 0
fi
# A copy left by an interrupted run would make `cp -r` nest the new one inside it.
rm -rf "$patched" "$patched.tmp"
mkdir -p "$dest_dir"
cp -r "$registry_src" "$patched.tmp"

for edit in $edits; do
    case $edit in
        cuda)
            grep -q '"dynamic-linking"' "$patched.tmp/Cargo.toml" ||
                { echo "candle-core $candle_ver: no dynamic-linking feature to switch" >&2; exit 1; }
            sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$patched.tmp/Cargo.toml"
            ;;
        grad)
            # Each call site reads `let s = grads.or_insert(arg)?; … *s = s.add(expr)?` (or `.sub`), with or
            # without a final `;`; the two statements become one call. The argument may hold nested brackets.
            PAIRUNI_EXPECT_MIN=40 perl -0pi -e "$(cat <<'PERL'
                my $paren = qr/(\((?:[^()]++|(?-1))*+\))/;
                my $n = 0;
                # Statements between the two that touch neither the accumulator nor `grads` stay, in order,
                # before the call (they could not touch them: the accumulator borrowed `grads` mutably).
                $n += s{let\s+(\w+)\s*=\s*grads\.or_insert\(([\w.]+)\)\?;(\s*)((?:(?!\b\1\b|grads\.).)*?)\*\1\s*=\s*\1\.(add|sub)$paren\?}
                       {my $f = $5 eq "add" ? "accumulate" : "accumulate_negated";
                        my ($sum, $arg, $e) = ($1, $2, substr($6, 1, -1));
                        # The accumulator had the argument's shape; nothing else of it may be read.
                        $e =~ s/\b$sum\.dims\(\)/$arg.dims()/g;
                        die "candle backprop: `$e` reads the accumulator `$sum`\n" if $e =~ /\b$sum\b/;
                        "$4grads.$f($arg, $e)?"}gse;
                my $helpers = <<'RUST';
    /// Adds `grad` to the gradient of `tensor`; the first contribution is stored as it is (pairuni's patch).
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        self.accumulate_signed(tensor, grad, false)
    }

    /// Subtracts `grad` from the gradient of `tensor`; the first contribution is stored negated.
    fn accumulate_negated(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        self.accumulate_signed(tensor, grad, true)
    }

    fn accumulate_signed(&mut self, tensor: &Tensor, grad: &Tensor, negated: bool) -> Result<()> {
        if !accumulate_first() {
            let sum = self.or_insert(tensor)?;
            *sum = if negated { sum.sub(grad)? } else { sum.add(grad)? };
            return Ok(());
        }
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = if negated { entry.get().sub(grad)? } else { entry.get().add(grad)? };
                entry.insert(sum);
            }
            Entry::Vacant(entry) => {
                // The checks the add onto zeros made.
                tensor.same_shape_binary_op(grad, "accumulate")?;
                if tensor.dtype() != grad.dtype() {
                    Err(Error::DTypeMismatchBinaryOp {
                        lhs: tensor.dtype(),
                        rhs: grad.dtype(),
                        op: "accumulate",
                    }
                    .bt())?
                }
                if !tensor.device().same_device(grad.device()) {
                    Err(Error::DeviceMismatchBinaryOp {
                        lhs: tensor.device().location(),
                        rhs: grad.device().location(),
                        op: "accumulate",
                    }
                    .bt())?
                }
                let first = if negated {
                    grad.neg()?
                } else if grad.is_contiguous() {
                    grad.clone()
                } else {
                    grad.contiguous()?
                };
                entry.insert(first);
            }
        }
        Ok(())
    }

RUST
                my $anchor = "    /// Get the gradient tensor associated with the given tensor, or, if it does not exist,\n";
                my $found = s{\Q$anchor\E}{$helpers$anchor};
                my $switch = <<'RUST';

/// Whether a gradient starts from its first contribution (pairuni's patch; PAIRUNI_GRAD_ACCUMULATE=zeros: from
/// zeros, as candle does).
fn accumulate_first() -> bool {
    static FIRST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FIRST.get_or_init(|| std::env::var("PAIRUNI_GRAD_ACCUMULATE").map_or(true, |v| v != "zeros"))
}
RUST
                $_ .= $switch;
                die "candle backprop: $n accumulation sites rewritten, expected at least $ENV{PAIRUNI_EXPECT_MIN}\n"
                    if $n < $ENV{PAIRUNI_EXPECT_MIN};
                die "candle backprop: no GradStore::or_insert to put the helpers beside\n" unless $found;
PERL
)" "$patched.tmp/src/backprop.rs"
            ;;
        *)
            echo "patch-candle.sh: unknown edit '$edit' (grad, cuda)" >&2
            exit 1
            ;;
    esac
done
echo "$stamp" >"$patched.tmp/.pairuni-patched"
mv "$patched.tmp" "$patched"
echo "$patched"
