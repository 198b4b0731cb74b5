//! Link facts for libtorch (see scripts/link_libtorch.rs).

include!("../scripts/link_libtorch.rs");

fn main() {
    link_libtorch();
}
