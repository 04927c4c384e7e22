//! Tells the test suite whether this machine can use io_uring, so the
//! tests of batched writes say `ignored` where it cannot, rather than
//! passing without having run.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(io_uring)");
    println!("cargo::rerun-if-changed=build.rs");
    if io_uring_works() {
        println!("cargo::rustc-cfg=io_uring");
    }
}

#[cfg(target_os = "linux")]
fn io_uring_works() -> bool {
    // io_uring_setup(2) with one entry; the parameters are 120 bytes
    // (struct io_uring_params), zeroed.
    let mut params = [0u8; 120];
    // SAFETY: the kernel writes at most sizeof(struct io_uring_params)
    // bytes into `params`, which is that large; the returned descriptor is
    // closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is the descriptor io_uring_setup just returned.
    unsafe { libc::close(fd as i32) };
    true
}

#[cfg(not(target_os = "linux"))]
fn io_uring_works() -> bool {
    false
}
