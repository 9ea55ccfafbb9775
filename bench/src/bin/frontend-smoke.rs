//! Manual check of a vhost-user-net backend with the bench frontend: handshake, print what was
//! negotiated, blast TX frames for a while and count RX frames.
//!
//! `frontend-smoke --socket /tmp/vutap.sock --order qemu --size 60 --seconds 5`

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use vutap_frontend::{FrontendOptions, HandshakeOrder, NetFrontend, VirtioNetHdr};

#[derive(Clone, Copy, ValueEnum)]
enum Order {
    Ch,
    Qemu,
}

#[derive(Parser)]
struct Args {
    /// vhost-user socket of the backend.
    #[arg(long)]
    socket: PathBuf,
    /// Listen on the socket and wait for the backend to connect (backend in client mode).
    #[arg(long)]
    listen: bool,
    #[arg(long, value_enum, default_value = "ch")]
    order: Order,
    #[arg(long, default_value_t = 1)]
    pairs: u16,
    /// TX frame size in bytes (Ethernet frame, no virtio header); 0 = do not send.
    #[arg(long, default_value_t = 60)]
    size: usize,
    #[arg(long, default_value_t = 3)]
    seconds: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let args = Args::parse();
    let opts = FrontendOptions {
        queue_pairs: args.pairs,
        order: match args.order {
            Order::Ch => HandshakeOrder::CloudHypervisor,
            Order::Qemu => HandshakeOrder::Qemu,
        },
        ..FrontendOptions::default()
    };
    let mut fe = if args.listen {
        let _ = std::fs::remove_file(&args.socket);
        let l = UnixListener::bind(&args.socket)?;
        NetFrontend::accept(&l, opts)?
    } else {
        NetFrontend::connect(&args.socket, opts)?
    };
    println!(
        "offered {:#x} acked {:#x} protocol {:?} queue_num {:?} hdr_len {}",
        fe.offered_features(),
        fe.acked_features(),
        fe.protocol_features(),
        fe.backend_queue_num(),
        fe.hdr_len()
    );
    println!("config {:?}", fe.config()?);

    // Broadcast frames with a local-experimental ethertype so nothing on the far side acts on them.
    let mut frame = vec![0u8; args.size.max(14)];
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0x5e, 0x01]);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    let batch: Vec<&[u8]> = vec![&frame[..]; 64];
    let hdr = VirtioNetHdr::default();
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    while Instant::now() < end {
        for pair in 0..args.pairs {
            if args.size > 0 {
                fe.reclaim_tx(pair)?;
                fe.send_batch(pair, &hdr, &batch)?;
            }
            fe.recv_batch(pair, 256, |_, _| {})?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let s = fe.stats();
    println!("{:?}\nTX {:.0} pps completed, RX {:.0} pps", s, s.tx_completed as f64 / secs, s.rx_frames as f64 / secs);
    Ok(())
}
